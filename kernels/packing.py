"""Weight packing shared by every backend: two 4-bit codes per byte, low nibble first.

Element `k = 2j` of a row sits in the low nibble of byte `j`, `k = 2j + 1` in the high nibble; an
odd `K` is padded with 0. Codes of more than 4 bits are stored one per byte (no packing).
"""

from __future__ import annotations

import torch
from torch import Tensor


def packed_width(in_features: int, bits: int) -> int:
    """Bytes per output row of `qweight`."""
    return (in_features + 1) // 2 if bits <= 4 else in_features


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be in 2..8, got {bits}")


def pack_weight(q: Tensor, bits: int) -> Tensor:
    """Integer codes `q` (N, K), values in [0, 2^bits - 1], to the stored uint8 layout."""
    _check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"expected integer weight codes of shape (N, K), got {tuple(q.shape)}")
    if q.is_floating_point():
        if not torch.equal(q, q.round()):
            raise ValueError("weight codes must be integers")
    qi = q.to(torch.int16)
    if qi.numel() and (int(qi.min()) < 0 or int(qi.max()) > 2**bits - 1):
        raise ValueError(f"weight codes must lie in [0, {2**bits - 1}] for {bits} bits")
    q8 = qi.to(torch.uint8)
    if bits > 4:
        return q8.contiguous()
    n, k = q8.shape
    if k % 2:
        q8 = torch.cat([q8, q8.new_zeros(n, 1)], dim=1)
    return (q8[:, 0::2] | (q8[:, 1::2] << 4)).contiguous()


def unpack_weight(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """Stored uint8 layout back to codes (N, K) uint8; widened codes (N, K) come back unchanged."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"expected a uint8 (N, bytes) tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] == in_features:  # one code per byte already (also 4-bit packing of K = 1)
        return packed.contiguous()
    width = packed_width(in_features, bits)
    if packed.shape[1] != width:
        raise ValueError(
            f"packed weight has {packed.shape[1]} bytes per row; {bits}-bit codes of {in_features} "
            f"input features need {width}"
        )
    if bits > 4:
        return packed.contiguous()
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :in_features].contiguous()
