"""Function-preserving input transforms that make per-token low-bit activations more accurate.

A layer `y = x Wᵀ` equals `(x Q / s)(W Q · s)ᵀ` for an orthogonal `Q` and a per-channel scale `s`.
- rotation: `Q = D · blockdiag(H_b) / √b`, random signs `D` times a Hadamard matrix, spreads
  outlier channels over a block so a per-token scale fits all of them (a plain Hadamard without
  the signs measured worse than no rotation on the demo model);
- smoothing: `s` moves range from activations into weights (SmoothQuant), optionally trained.
The rotation is folded into the stored weight; at run time the input is rotated (a fast
Walsh–Hadamard transform) and divided by `s` before quantization.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor

from .kernels_import import qvgen_kernels

exact_div = qvgen_kernels.common.exact_div

TRANSFORMS = ("none", "hadamard", "smooth", "smooth_hadamard")


def uses_rotation(kind: str) -> bool:
    return kind in ("hadamard", "smooth_hadamard")


def uses_smoothing(kind: str) -> bool:
    return kind in ("smooth", "smooth_hadamard")


def hadamard_block(n: int, max_block: int) -> int:
    """Largest power of two dividing `n`, capped at `max_block` (block-diagonal for other widths)."""
    b = n & -n
    return min(b, max_block)


def fwht(x: Tensor, block: int) -> Tensor:
    """Normalised Walsh–Hadamard transform over consecutive blocks of the last dim (O(n log b)):
    the kernels' butterflies (`qvgen_kernels.common.fwht_fp32`, whose order fixes the rounding)
    in `x`'s dtype, then their exact division by √block."""
    return exact_div(qvgen_kernels.common.fwht_fp32(x, block), math.sqrt(block)).to(x.dtype)


def random_signs(n: int, name: str, seed: int) -> Tensor:
    """±1 per channel, reproducible from the layer name and the seed."""
    g = torch.Generator().manual_seed((zlib.crc32(name.encode()) + 7919 * seed) % (2**63))
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


def rotate(x: Tensor, signs: Tensor, block: int) -> Tensor:
    """`x Q` with `Q = diag(signs) · blockdiag(H_b)/√b` (rows of a weight rotate the same way)."""
    return fwht(x * signs.to(x.dtype), block)


def unrotate(x: Tensor, signs: Tensor, block: int) -> Tensor:
    """`x Qᵀ`: inverse of `rotate` (H is symmetric and orthogonal once normalised)."""
    return fwht(x, block) * signs.to(x.dtype)


def smoothing_scales(act_absmax: Tensor, weight: Tensor, alpha: float = 0.5) -> Tensor:
    """SmoothQuant: `s_j = max|x_j|^α / max|W_j|^(1-α)`, clamped away from 0."""
    w_absmax = weight.detach().abs().amax(dim=0).float().clamp(min=1e-5)
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp(min=1e-3, max=1e3)


def smooth_group(bucket: Tensor | int, n_buckets: int, groups: int) -> Tensor | int:
    """Smoothing group of timestep bucket(s): `groups` equal runs of consecutive buckets."""
    return bucket * groups // n_buckets


def cayley(param: Tensor) -> Tensor:
    """Orthogonal (…, b, b) blocks from unconstrained ones: `A = P − Pᵀ` (skew), `C = (I − A)⁻¹(I + A)`.

    The Cayley map is exactly orthogonal for any `P` and is the identity at `P = 0`, so a learned
    rotation starts where the fixed one (the randomised Hadamard) is and gradient steps stay orthogonal.
    """
    a = param - param.transpose(-1, -2)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(eye - a, eye + a)


def block_rotate(x: Tensor, blocks: Tensor) -> Tensor:
    """`x · blockdiag(blocks)` over the last dim, blocks (K/b, b, b); a weight's rows rotate the same way."""
    nb, b, _ = blocks.shape
    v = x.reshape(*x.shape[:-1], nb, b)
    return torch.einsum("...nb,nbc->...nc", v, blocks.to(x.dtype)).reshape(x.shape)
