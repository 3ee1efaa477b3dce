"""QVGen: 4-bit (W4A4) video diffusion transformers by quantization-aware training.

Where things live (docs/architecture.md):
- the method (core): `quantizers`, `schemes` (each scheme's arithmetic: `qvgen`, `convrot_w4a4`),
  `layers` (QVGenLinear, the training form), `packed_linear` (PackedLinear, the inference form),
  `decay` (Φ rank decay), `surgery` (swapping linear layers);
- the format (core): `packed_layer` (a packed layer's tensors, their dtype rule, `quantize_linear`),
  `checkpoint` (docs/format.md); `api` saves and loads any scheme's file;
- adapters (`qvgen.adapters`): ComfyUI's names and native file, diffusers skeletons, the authors' layout;
- the doors: `qvgen.train` (QAT CLI), `qvgen.diffusers_backend` (from_pretrained), `qvgen_nodes/`
  (ComfyUI); the kernels live in `kernels/` (package `qvgen_kernels`), reached through `kernels_import`.

`import qvgen` has one side effect, stated here: it registers quant_method "qvgen" with diffusers
(at once if diffusers is imported, otherwise when it is; never importing diffusers itself).
"""

from . import diffusers_backend
from .adapters.comfy.native import ComfyExportReport, export_comfy, load_comfy_native
from .api import load_quantized_model, save_quantized
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .config import ConfigError, QVGenConfig
from .decay import RankDecaySchedule
from .layers import QVGenLinear
from .packed_linear import PackedLinear
from .schemes.convrot import ConvRotLinear
from .surgery import ConversionReport, build_packed_model, convert_model, pack_model

diffusers_backend.install()

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ComfyExportReport",
    "ConfigError",
    "ConversionReport",
    "ConvRotLinear",
    "PackedLinear",
    "QVGenConfig",
    "QVGenLinear",
    "RankDecaySchedule",
    "build_packed_model",
    "convert_model",
    "export_comfy",
    "load_checkpoint",
    "load_comfy_native",
    "load_quantized_model",
    "pack_model",
    "save_quantized",
]
