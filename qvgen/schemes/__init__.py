"""Quantization schemes: the arithmetic a `QVGenLinear` trains for and the form it is shipped in.

- `qvgen`: the paper's W{b}A{b} (asymmetric per-channel weights, per-token activations with learned
  per-timestep clipping, optional rotation/smoothing), shipped as a packed QVGen checkpoint;
- `convrot_w4a4`: ComfyUI's native ConvRot arithmetic, shipped as a ComfyUI single file;
- `nvfp4`: ComfyUI's native NVFP4 (e2m1 with fp8 block scales), shipped as a ComfyUI single file;
- `svdquant_w4a4`: comfy-kitchen's SVDQuant W4A4 (per-group int4, smoothing, Φ kept as its low-rank branch);
- `w4a8_int8`: comfy-kitchen's grouped codebook W4A8 (ComfyUI format `asym_w4a8_int8`, int8 tokens).
"""

from __future__ import annotations

from torch import nn

from . import convrot, nvfp4, qvgen, svdquant, w4a8
from .base import FILE_FORMATS, Scheme

SCHEMES: dict[str, Scheme] = {
    s.name: s for s in (qvgen.SCHEME, convrot.SCHEME, nvfp4.SCHEME, svdquant.SCHEME, w4a8.SCHEME)
}

# every inference-layer class any scheme builds (for "is this layer already quantized?")
INFERENCE_TYPES: tuple[type[nn.Module], ...] = tuple(t for s in SCHEMES.values() for t in s.inference_types)


def get_scheme(name: str) -> Scheme:
    """The scheme called `name`; a KeyError naming the known ones otherwise."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise KeyError(f"unknown quantization scheme {name!r}; expected one of {list(SCHEMES)}") from None


__all__ = ["FILE_FORMATS", "INFERENCE_TYPES", "SCHEMES", "Scheme", "get_scheme"]
