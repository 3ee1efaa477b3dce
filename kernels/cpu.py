"""The fast pure-PyTorch path ("cpu" backend): per-token quantization in a few fused-ish passes,
one exact int8 × int8 → int32 GEMM (`torch._int_mm`) and a rank-1 zero-point epilogue.

Why `_int_mm`: on CPU it beats both fp32 and bf16 matmul by a wide margin (see
docs/benchmarks.md). Subtracting the zero points before the GEMM keeps both operands in int8
and leaves only one correction term for the real weight zero point:

    a = q_x - c_x,  b = q_w - c_w         (c_x = z_x for ≤ 7 bits, 128 for 8 bits; c_w = 0 or 128)
    Σ(q_x - z_x)(q_w - z_w) = [A + d_x Σb] + (c_w - z_w) Σ(q_x - z_x),   A = a @ bᵀ,  d_x = c_x - z_x

Everything in brackets is an exact integer; only the last term carries the real `z_w`.
The same code runs on any device where the ops exist (it falls back to a float GEMM that is
exact for these magnitudes when `_int_mm` is refused).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import (
    SCALE_MIN,
    ClipArg,
    check_act_bits,
    check_act_group,
    check_linear_args,
    check_transform,
    has_transform,
    row_factors,
)
from .packing import unpack_weight


def _quant_rows(x2d: Tensor, lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Scale (M,1), zero (M,1) and `round(x / s)` (M,K), all float32, with the training's fp32 ops."""
    qmax = 2**bits - 1
    xf = x2d if x2d.dtype == torch.float32 else x2d.float()
    xmin = xf.amin(dim=-1, keepdim=True).mul_(lo[:, None])
    xmax = xf.amax(dim=-1, keepdim=True).mul_(hi[:, None])
    s = (xmax - xmin).div_(qmax).clamp_(min=SCALE_MIN)
    z = torch.div(-xmin, s).round_().clamp_(0, qmax)
    r = torch.div(xf, s).round_()
    return s, z, r


def quantize_activation(
    x: Tensor,
    clip_lo: ClipArg,
    clip_hi: ClipArg,
    bits: int,
    *,
    input_signs: Tensor | None = None,
    rot_block: int = 0,
    smooth: Tensor | None = None,
    act_group: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as `reference.quantize_activation`, in fewer passes."""
    qmax = check_act_bits(bits)
    lead, k = x.shape[:-1], x.shape[-1]
    if k == 0:
        raise ValueError("cannot quantize rows of length 0")
    g = check_act_group(k, act_group)
    lo = row_factors(clip_lo, lead, x.device).repeat_interleave(k // g)
    hi = row_factors(clip_hi, lead, x.device).repeat_interleave(k // g)
    x2d = _transformed(x.reshape(-1, k), k, input_signs, rot_block, smooth)
    s, z, r = _quant_rows(x2d.reshape(-1, g), lo, hi, bits)  # one row per (token, group)
    q = r.add_(z).clamp_(0, qmax)
    # fp32 sums of integers are exact while every partial sum stays below 2^24
    qsum = q.sum(dim=-1, keepdim=True) if g * qmax < 2**24 else q.double().sum(dim=-1, keepdim=True)
    stat = (*lead, k // g)
    return (
        q.to(torch.uint8).reshape(x.shape),
        s.reshape(stat),
        z.reshape(stat),
        qsum.to(torch.int32).reshape(stat),
    )


FWHT_CHUNK = 1 << 16  # elements per cache-resident chunk of the CPU transform (256 KB of fp32)


def transform_rows(x2d: Tensor, signs: Tensor | None, block: int, smooth: Tensor | None) -> Tensor:
    """`common.apply_transform` bit for bit (same fp32 operations in the same order), faster.

    Rows are processed in chunks that stay in cache. Inside a chunk the blocks are transposed
    to (block, n) so every butterfly stage works on long contiguous runs (`a ± b` over whole
    half-planes) instead of stride-h gathers; the sign multiply rides on the transposing copy,
    the division by √block and by the smoothing scales on the copy back.
    """
    m, k = x2d.shape
    if signs is None or block <= 1:  # no butterflies: elementwise only
        v = x2d.float() * signs if signs is not None else x2d.float()
        return v / smooth if smooth is not None else v
    out = torch.empty(m, k, dtype=torch.float32, device=x2d.device)
    rows = max(1, FWHT_CHUNK // k)
    nb = k // block  # blocks per row
    ping = torch.empty(min(rows, m) * k, dtype=torch.float32, device=x2d.device)
    pong = torch.empty_like(ping)
    signs_t = signs.view(nb, block).t()  # (block, nb)
    sqrt_b = math.sqrt(block)
    for r0 in range(0, m, rows):
        xc = x2d[r0 : r0 + rows]
        r = xc.shape[0]
        n = r * nb
        src = ping[: r * k].view(block, r, nb)
        torch.mul(xc.reshape(r, nb, block).permute(2, 0, 1), signs_t[:, None, :], out=src)
        src, dst = ping, pong
        h = 1
        while h < block:
            a = src[: r * k].view(block // (2 * h), 2, h * n)
            d = dst[: r * k].view(block // (2 * h), 2, h * n)
            torch.add(a[:, 0], a[:, 1], out=d[:, 0])
            torch.sub(a[:, 0], a[:, 1], out=d[:, 1])
            src, dst = dst, src
            h *= 2
        o = out[r0 : r0 + rows].view(r, nb, block)
        torch.div(src[: r * k].view(block, r, nb).permute(1, 2, 0), sqrt_b, out=o)
        if smooth is not None:
            o.div_(smooth.view(nb, block))
    return out


def _transformed(x2d: Tensor, k: int, input_signs: Tensor | None, rot_block: int, smooth: Tensor | None) -> Tensor:
    if not has_transform(input_signs, rot_block, smooth):
        return x2d
    return transform_rows(x2d, *check_transform(k, input_signs, rot_block, smooth, x2d.device))


_INT_MM_OK: dict[str, bool] = {}


def _exact_rowsum(v: Tensor, vmax: int) -> Tensor:
    """Row sums of integer-valued float32 (M, 1); exact (fp32 while K·vmax < 2^24, else fp64)."""
    if v.shape[1] * vmax < 2**24:
        return v.sum(dim=-1, keepdim=True)
    return v.double().sum(dim=-1, keepdim=True).float()


def int_matmul(a: Tensor, b_nk: Tensor) -> Tensor:
    """Exact `a @ b_nkᵀ` for int8 operands, int32 result."""
    key = a.device.type
    if _INT_MM_OK.get(key, True):
        try:
            return torch._int_mm(a, b_nk.t())
        except (RuntimeError, AttributeError):
            _INT_MM_OK[key] = False
    k = a.shape[1]
    dtype = torch.float32 if k * 128 * 128 < 2**24 else torch.float64
    return (a.to(dtype) @ b_nk.to(dtype).t()).round_().to(torch.int32)


def weight_int8(qweight: Tensor, w_bits: int, in_features: int) -> tuple[Tensor, int]:
    """Weight codes shifted into int8: `q_w - c_w` (N, K) and `c_w`."""
    q = unpack_weight(qweight, w_bits, in_features)
    if w_bits == 8:
        return (q ^ 0x80).view(torch.int8), 128  # q - 128 without a widening pass
    return q.view(torch.int8), 0


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
    act_group: int = 0,
) -> Tensor:
    check_linear_args(x, qweight, w_scale, w_zero, w_qsum, bias, in_features, w_bits, a_bits, phi_down, phi_up)
    out_dtype = out_dtype or x.dtype
    lead, k, n = x.shape[:-1], in_features, qweight.shape[0]
    x2d = _transformed(x.reshape(-1, k), k, input_signs, rot_block, smooth)
    s_w = w_scale.reshape(1, n).float()
    z_w = w_zero.reshape(1, n).float()
    if a_bits is None:
        return _weight_only(x2d, qweight, s_w, z_w, bias, w_bits, phi_down, phi_up).to(out_dtype).reshape(*lead, n)

    lo = row_factors(clip_lo, lead, x.device)
    hi = row_factors(clip_hi, lead, x.device)
    if check_act_group(k, act_group) < k:
        layer = (qweight, w_bits, s_w, z_w, bias, phi_down, phi_up)
        return _grouped_linear(x2d, lo, hi, a_bits, act_group, *layer).to(out_dtype).reshape(*lead, n)
    qmax = 2**a_bits - 1
    s_x, z_x, r = _quant_rows(x2d, lo, hi, a_bits)
    b, c_w = weight_int8(qweight, w_bits, k)
    q = r.add_(z_x).clamp_(0, qmax)  # q_x as float; scalar bounds are ~3× cheaper than per-row ones
    qsum = _exact_rowsum(q, qmax)
    rsum = qsum - k * z_x  # Σ(q_x - z_x), exact
    shift = 0.0  # what has been subtracted from q in place
    if a_bits <= 7:  # a = q_x - z_x ∈ [-127, 127]; subtracting in int8 moves 4× fewer bytes
        a = q.to(torch.int8).sub_(z_x.to(torch.int8))
        acc = int_matmul(a, b)
    else:  # a = q_x - 128, and d_x Σb = (128 - z_x)(Σ q_w - K c_w) restores Σ(q_x - z_x) b
        shift = 128.0  # in place: a float temporary of x's size cost more than the GEMM at large M
        a = q.sub_(shift).to(torch.int8)
        acc = int_matmul(a, b)
        s_b = w_qsum.reshape(1, n).to(torch.int32) - k * c_w
        acc.add_((128 - z_x).to(torch.int32) * s_b)
    y = acc.to(torch.float32)
    y.addmm_(rsum, c_w - z_w)  # + (c_w - z_w) Σ(q_x - z_x), the real-zero-point term
    y.mul_(s_x).mul_(s_w)
    if bias is not None:
        y.add_(bias.reshape(1, n).float())
    if phi_down is not None:
        down = (q.sub_(z_x - shift) @ phi_down.float().t()).mul_(s_x)  # x̂ Rᵀ with x̂ = s_x (q_x - z_x)
        y.addmm_(down, phi_up.float().t())
    return y.to(out_dtype).reshape(*lead, n)


TILE_M, TILE_N = 128, 1024  # grouped path: a (128, 1024) fp32 tile of y is 512 KB, resident in L2


def _grouped_linear(
    x2d: Tensor,
    lo: Tensor,
    hi: Tensor,
    a_bits: int,
    g: int,
    qweight: Tensor,
    w_bits: int,
    s_w: Tensor,
    z_w: Tensor,
    bias: Tensor | None,
    phi_down: Tensor | None,
    phi_up: Tensor | None,
) -> Tensor:
    """`x̂ Ŵᵀ + b (+ (x̂ Rᵀ) Lᵀ)` with group-wise activation scales, float32 (M, N).

    One exact int8 GEMM per group of g features, `A_j = a_j @ b_jᵀ` (K = g), each scaled by its
    group's `s_j` (M, 1) and summed in fp32; with `a = q_x - c_x`, `b = q_w - c_w`:

        Σ_{k∈j} (q_x - z_j)(q_w - z_w) = A_j + (c_x - z_j) Σ_{k∈j} b + (c_w - z_w) Σ_{k∈j} (q_x - z_j)

    and the last term summed over groups is one rank-1 update with `t = Σ_j s_j Σ_{k∈j} (q_x - z_j)`.
    """
    m, k = x2d.shape
    n, n_groups = qweight.shape[0], k // g
    qmax = 2**a_bits - 1
    lo, hi = lo.repeat_interleave(n_groups), hi.repeat_interleave(n_groups)  # one row per (token, group)
    s_x, z_x, r = _quant_rows(x2d.reshape(-1, g), lo, hi, a_bits)
    q = r.add_(z_x).clamp_(0, qmax).view(m, n_groups, g)
    s_x, z_x = s_x.view(m, n_groups, 1), z_x.view(m, n_groups, 1)
    b, c_w = weight_int8(qweight, w_bits, k)
    b_groups = b.view(n, n_groups, g).transpose(0, 1).contiguous()  # (G, N, g): each group's columns contiguous
    c_x = z_x if a_bits <= 7 else torch.full_like(z_x, 128.0)  # a = q_x - c_x fits int8
    a_groups = (q - c_x).to(torch.int8).transpose(0, 1).contiguous()  # (G, M, g)
    s_cols = s_x.transpose(0, 1).contiguous()  # (G, M, 1)
    d_x = (128 - z_x).to(torch.int32).transpose(0, 1).contiguous() if a_bits > 7 else None  # c_x - z_j
    b_sums = b_groups.sum(dim=2, dtype=torch.int32) if a_bits > 7 else None  # (G, N): Σ_{k∈j} b
    y = torch.zeros(m, n, dtype=torch.float32, device=x2d.device)
    for m0 in range(0, m, TILE_M):  # tiles of y stay in cache across the K/g products summed into them
        rows = slice(m0, m0 + TILE_M)
        for n0 in range(0, n, TILE_N):
            cols = slice(n0, n0 + TILE_N)
            y_tile = y[rows, cols]
            for j in range(n_groups):
                acc = int_matmul(a_groups[j, rows], b_groups[j, cols])
                if d_x is not None:  # (c_x - z_j) Σ_{k∈j} b, exact in int32
                    acc.add_(d_x[j, rows] * b_sums[j, cols].view(1, -1))
                y_tile.addcmul_(acc, s_cols[j, rows])  # int32 promoted to fp32 inside the kernel: exact below 2^24
    rsum = _exact_rowsum((q - z_x).view(m * n_groups, g), 2 * qmax).view(m, n_groups, 1)  # Σ_{k∈j}(q_x - z_j)
    t = (rsum * s_x).sum(dim=1)  # (M, 1)
    y.addmm_(t, c_w - z_w).mul_(s_w)
    if bias is not None:
        y.add_(bias.reshape(1, n).float())
    if phi_down is not None:
        x_hat = ((q - z_x) * s_x).view(m, k)
        y.addmm_(x_hat @ phi_down.float().t(), phi_up.float().t())
    return y


def _weight_only(
    x2d: Tensor,
    qweight: Tensor,
    s_w: Tensor,
    z_w: Tensor,
    bias: Tensor | None,
    w_bits: int,
    phi_down: Tensor | None,
    phi_up: Tensor | None,
) -> Tensor:
    """a_bits=None: `x Ŵᵀ + b (+ (x Rᵀ) Lᵀ)` with Ŵ dequantized in float32."""
    q = unpack_weight(qweight, w_bits, x2d.shape[1]).float()
    w_hat = (q - z_w.t()).mul_(s_w.t())
    xf = x2d.float()
    y = xf @ w_hat.t()
    if bias is not None:
        y.add_(bias.reshape(1, -1).float())
    if phi_down is not None:
        y.addmm_(xf @ phi_down.float().t(), phi_up.float().t())
    return y
