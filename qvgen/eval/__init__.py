"""`python -m qvgen.eval`: how far a quantized model is from its full-precision original, and where.

Same prompts, same seeds, offline: the velocity error at every sampling step (both models fed the
original's trajectory), PSNR/SSIM of the frames each model samples on its own (where the model
works in pixel space, as the demo does), and a per-layer table of which layers carry the error.
"""

from .image_metrics import psnr, ssim
from .run import evaluate

__all__ = ["evaluate", "psnr", "ssim"]
