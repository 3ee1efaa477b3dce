"""QVGen low-bit kernels (installed as `qvgen_kernels`).

One interface, three backends:

- "torch":  `reference.py`, exact float64/int64 arithmetic; what everything is tested against.
- "cpu":    `cpu.py`, the fastest correct pure-PyTorch path (int8 `torch._int_mm`); any device.
- "triton": `triton_linear.py`, fused CUDA kernels (per-token quantization, int4-packed weights
            widened to int8 in registers, int8 MMA with int32 accumulation, zero-point epilogue).

"auto" picks triton on CUDA when triton is importable, else cpu; the argument or the
`QVGEN_KERNEL_BACKEND` environment variable overrides. Importing this package never imports
triton, so it works on machines without triton or a GPU.

The arithmetic (DESIGN.md, "W4A4 arithmetic"; docs/format.md): per token
`s_x = clamp((max·c_hi − min·c_lo)/qmax, 1e-5)`, `z_x = clamp(round(−min·c_lo/s_x), 0, qmax)`,
`q_x = clamp(round(x/s_x) + z_x, 0, qmax)`; per output channel `Ŵ = s_w (q_w − z_w)` with a real
`z_w`; `y = x̂ Ŵᵀ + b (+ (x̂ Rᵀ) Lᵀ)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import convrot, cpu, reference
from .backend import ENV_VAR, available_backends, resolve_backend
from .common import ClipArg
from .packing import pack_weight, packed_width, unpack_weight

__all__ = [
    "ENV_VAR",
    "convrot",
    "available_backends",
    "pack_weight",
    "packed_width",
    "quantize_activation",
    "quantized_linear",
    "resolve_backend",
    "unpack_weight",
]


def _triton():
    from . import triton_linear  # imports triton; only reached when the triton backend was chosen

    return triton_linear


def quantize_activation(
    x: Tensor,
    clip_lo: ClipArg,
    clip_hi: ClipArg,
    bits: int,
    *,
    input_signs: Tensor | None = None,
    rot_block: int = 0,
    smooth: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token asymmetric quantization of `x` (last dim = K).

    Returns `q` (uint8, x's shape, values in [0, 2^bits − 1]), `scale` and `zero` (float32,
    `x.shape[:-1] + (1,)`, zero integer-valued) and `qsum` (int32, same shape, `Σ_k q`).
    `clip_lo`/`clip_hi` are the effective clip factors: a number, or a tensor broadcastable to
    `x.shape[:-1]` (e.g. (B, 1) for a (B, L, K) input) or shaped `x.shape[:-1] + (1,)`.

    Optional input transform (issue #7; `qvgen.transforms`): what gets quantized is
    `x' = fwht(x · input_signs, rot_block) / smooth` — `input_signs` ±1 (K,) (int8 or float),
    `rot_block` the Hadamard block (a power of two ≤ 256 dividing K; 0 = no rotation), `smooth`
    positive float32 (K,) (None = 1). It is computed in fp32 with the rounding of
    `common.apply_transform` (radix-2 butterflies h = 1, 2, 4, …, `/ fp32(√b)`, `/ smooth`, each
    IEEE), which is also what the training path computes on fp32 inputs; the Triton kernel does it
    in registers (butterflies), so codes agree bit for bit across backends.
    """
    tf = dict(input_signs=input_signs, rot_block=rot_block, smooth=smooth)
    which = resolve_backend(backend, x.device)
    if which == "triton":
        return _triton().quantize_activation(x, clip_lo, clip_hi, bits, **tf)
    if which == "cpu":
        return cpu.quantize_activation(x, clip_lo, clip_hi, bits, **tf)
    return reference.quantize_activation(x, clip_lo, clip_hi, bits, **tf)


def quantized_linear(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    w_zero: Tensor,
    w_qsum: Tensor,
    bias: Tensor | None = None,
    *,
    in_features: int,
    w_bits: int,
    a_bits: int | None,
    clip_lo: ClipArg = 1.0,
    clip_hi: ClipArg = 1.0,
    phi_down: Tensor | None = None,
    phi_up: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    input_signs: Tensor | None = None,
    rot_block: int = 0,
    smooth: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """`y = x̂ Ŵᵀ + bias (+ (x̂ phi_downᵀ) phi_upᵀ)` from packed weights; shape `x.shape[:-1] + (N,)`.

    `a_bits=None` is weight-only (x is used as is). `out_dtype` defaults to x's dtype.
    `input_signs`, `rot_block`, `smooth`: the input transform of `quantize_activation`; x̂ (and
    what Φ's down-projection sees) is quantized from `x'` (weight-only: x̂ = x').
    """
    kwargs = dict(
        in_features=in_features,
        w_bits=w_bits,
        a_bits=a_bits,
        clip_lo=clip_lo,
        clip_hi=clip_hi,
        phi_down=phi_down,
        phi_up=phi_up,
        out_dtype=out_dtype,
        input_signs=input_signs,
        rot_block=rot_block,
        smooth=smooth,
    )
    which = resolve_backend(backend, x.device)
    if which == "triton":
        return _triton().quantized_linear(x, qweight, w_scale, w_zero, w_qsum, bias, **kwargs)
    if which == "cpu":
        return cpu.quantized_linear(x, qweight, w_scale, w_zero, w_qsum, bias, **kwargs)
    return reference.quantized_linear(x, qweight, w_scale, w_zero, w_qsum, bias, **kwargs)
