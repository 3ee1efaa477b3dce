"""`python -m qvgen.eval`: how far a quantized model is from its full-precision original, and where.

Same prompts, same seeds, offline: the velocity error at every sampling step (both models fed the
original's trajectory), PSNR/SSIM of the frames each model samples on its own (the demo's pixel-space
samples, or a diffusers pipeline's VAE-decoded videos), and a per-layer table of which layers carry
the error.
"""

from .image_metrics import psnr, ssim
from .pipeline import evaluate_pipeline
from .run import evaluate

__all__ = ["evaluate", "evaluate_pipeline", "psnr", "ssim"]
