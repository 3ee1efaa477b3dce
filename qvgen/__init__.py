"""QVGen: 4-bit (W4A4) video diffusion transformers by quantization-aware training.

Where things live:
- the method: `quantizers` (weight/activation quantizers), `layers` (QVGenLinear training form,
  PackedLinear inference form), `decay` (Φ rank decay), `convert` (model surgery);
- the format: `packed_layer` (a packed layer's tensors, their dtype rule, `quantize_linear`),
  `checkpoint` (docs/format.md);
- ComfyUI's native ConvRot W4A4 scheme: `convrot` (its arithmetic), `comfy_native` (export/load);
- the doors: `qvgen.train` (QAT CLI), `qvgen.diffusers_backend` (from_pretrained), `qvgen_nodes/`
  (ComfyUI); the kernels live in `kernels/` (package `qvgen_kernels`).
"""

from . import diffusers_backend  # noqa: F401  (registers quant_method "qvgen" with diffusers, lazily)
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_quantized_model, save_quantized
from .comfy_native import ComfyExportReport, export_comfy, load_comfy_native
from .config import ConfigError, QVGenConfig
from .convert import ConversionReport, build_packed_model, convert_model, pack_model
from .decay import RankDecaySchedule
from .layers import ConvRotLinear, PackedLinear, QVGenLinear

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
