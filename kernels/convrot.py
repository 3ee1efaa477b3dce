"""ConvRot (comfy-kitchen's `convrot_w4a4` layout) in plain PyTorch: rotation, int4 packing,
per-token symmetric quantization and the exact integer GEMM; what `qvgen.schemes.convrot`
trains for and its inference layer runs.

- rotation: the input features are split into groups of 256 and each group is multiplied by the
  regular Hadamard matrix `H = H4^{⊗4} / 16`; `H` is symmetric and orthogonal, so
  `x Wᵀ = (x H)(W H)ᵀ`: the weight is stored rotated, the input is rotated at run time;
- weight: signed symmetric int4 in [-7, 7] with one scale per output row, two codes per byte
  (even column in the low nibble), stored as int8 `(out, K/2)`;
- activations: each token of `x H` quantized symmetrically with its own absmax scale
  (`/ 7` for int4 tokens, `/ 127` for int8);
- `y = s_x s_w (Σ q_x q_w) + bias`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CONVROT_GROUP = 256
QUANT_GROUP = 64  # comfy-kitchen's int4 MMA group; ConvRot's scales are still one per row
INT4_MAX = 7
ABSMAX_MIN = 1e-10

_H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))
_cache: dict[tuple[int, str, torch.dtype], Tensor] = {}


def signed_max(bits: int) -> int:
    """Largest code of a signed symmetric `bits`-bit quantizer (7 for int4, 127 for int8)."""
    return 2 ** (bits - 1) - 1


def supports(in_features: int, group: int = CONVROT_GROUP) -> bool:
    """Whether ComfyUI can run a layer with this K as `convrot_w4a4` (otherwise it stays bf16)."""
    return in_features % group == 0 and in_features % QUANT_GROUP == 0


def regular_hadamard(size: int = CONVROT_GROUP, device: torch.device | str = "cpu", dtype=torch.float32) -> Tensor:
    """`H4^{⊗k} / √size`: symmetric, orthogonal, every entry ±1/√size (size a power of 4)."""
    k = round(math.log(size, 4)) if size >= 4 else 0
    if size < 4 or 4**k != size:
        raise ValueError(f"regular Hadamard size must be a power of 4, got {size}")
    key = (size, str(device), dtype)
    h = _cache.get(key)
    if h is None:
        h4 = torch.tensor(_H4, dtype=torch.float64)
        h = h4
        for _ in range(k - 1):
            h = torch.kron(h, h4)
        h = (h / math.sqrt(size)).to(device=device, dtype=dtype)
        _cache[key] = h
    return h


def rotate(x: Tensor, group: int = CONVROT_GROUP) -> Tensor:
    """`x` times `blockdiag(H, …, H)` along the last dim; applies to inputs and weight rows alike.

    A dense per-group matmul, the way comfy-kitchen's eager backend does it, so the rotated
    values (and hence every rounding decision) match the reference in float32.
    """
    k = x.shape[-1]
    if k % group:
        raise ValueError(f"ConvRot: {k} features are not a multiple of the rotation group {group}")
    h = regular_hadamard(group, x.device, x.dtype)
    return (x.reshape(-1, k // group, group) @ h).reshape(x.shape)


def absmax_scale(x: Tensor, qmax: int) -> Tensor:
    """Per-row symmetric scale `max|x| / qmax` (kept ≥ 1e-10 / qmax, as comfy-kitchen does)."""
    return x.abs().amax(dim=-1, keepdim=True).clamp(min=ABSMAX_MIN) / qmax


def quantize_codes(x: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """Integer codes (int8) of `fake_quant_symmetric`, round half to even like torch.round."""
    return torch.clamp(torch.round(x.float() / scale.float()), -qmax, qmax).to(torch.int8)


def pack_int4(q: Tensor) -> Tensor:
    """Signed int4 codes `(…, K)` → int8 `(…, K/2)`, even column in the low nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    lo = q[..., 0::2].to(torch.int32) & 0xF
    hi = q[..., 1::2].to(torch.int32) & 0xF
    return (lo | (hi << 4)).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4`: int8 `(…, K/2)` → signed codes int8 `(…, K)` in [-8, 7]."""
    b = packed.view(torch.uint8).to(torch.int32)
    lo, hi = b & 0xF, (b >> 4) & 0xF
    both = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], -1)
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def quantize_acts(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-token signed symmetric codes (int8 storage) and float32 scales `(M, 1)` of a rotated input."""
    qmax = signed_max(bits)
    s = absmax_scale(x.float(), qmax)
    return quantize_codes(x, s, qmax), s


def convrot_linear(
    x: Tensor,
    qweight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    *,
    act_bits: int = 4,
    group: int = CONVROT_GROUP,
) -> Tensor:
    """A ConvRot W4A4 layer in plain PyTorch (CPU or GPU): rotate, quantize tokens, integer GEMM.

    The integer products are summed exactly (int32 via `torch._int_mm` when available, else
    float64), then scaled in float32: the same result comfy-kitchen's kernels compute, up to
    their float rounding of the scales.
    """
    shape = x.shape
    k = shape[-1]
    if qweight.shape[-1] * 2 != k:
        raise ValueError(f"ConvRot: input has {k} features but the packed weight holds {qweight.shape[-1] * 2}")
    x2 = rotate(x.reshape(-1, k).float(), group)
    qx, sx = quantize_acts(x2, act_bits)
    qw = unpack_int4(qweight)
    acc = int_matmul(qx, qw)
    y = acc * sx * weight_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], qweight.shape[0])


def int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact `a @ bᵀ` of int8 matrices, as float32 (sums below 2^24 in every realistic layer)."""
    if a.device.type == "cpu" or (a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[0] % 8 == 0):
        try:
            return torch._int_mm(a.contiguous(), b.t().contiguous()).float()
        except RuntimeError:
            pass
    return (a.double() @ b.double().t()).float()
