"""Triton kernels for QVGen's quantized linear layer (W4A4, W4A8, W8A8, weight-only), CUDA.

Laid out like Triton's matmul tutorial: kernels, autotune configs and launchers side by side;
the PyTorch reference they are tested against is `reference.py`, the benchmark
`python -m qvgen.bench kernels`.

Data flow of the default (unfused) path, for M tokens, K inputs, N outputs:

1. `_act_quant_kernel` — one program per BLOCK_M rows, two sweeps over K: row min/max, then
   `q = clamp(rne(x / s) + z, 0, qmax)`. It writes `a = q - c_x` as int8 (c_x = z_x for ≤ 7
   bits, 128 for 8 bits), the row scale, zero and Σq, and — when Φ is present — Φ's
   down-projection `t = x̂ Rᵀ` (M × r, float32) from the same registers (a small tensor-core dot).
   For 4-bit-packed weights the int8 row is stored split: even k in the first half, odd k in the
   second, so the GEMM can pair them with the low and high nibbles without any interleave.
2. `_linear_kernel` — int8 `tl.dot` with int32 accumulation. The int4 weights are loaded as
   bytes and widened in registers (`& 0xF`, `>> 4`): Hopper has no int4 tensor cores, so int8
   MMA (2× bf16 peak) is the fast route there and on Ampere/Ada alike. The epilogue applies
   `y = s_x s_w ([Σab + d_x Σb] + (c_w - z_w) Σ(q_x - z_x)) + bias (+ t Lᵀ)`, the bracket exact in
   int32, the real weight zero point in float32.

Fused variant (`A_SRC=2`): the GEMM quantizes x itself in its prologue/main loop. Every
N-program then repeats the row min/max sweep and the per-element division (an exact `div.rn`,
~10 instructions) that the unfused path does once, so for large N it costs more CUDA-core time
than the int8 MMA it feeds (≈ 15 instr/element × BLOCK_M·BLOCK_K vs BLOCK_M·BLOCK_N·BLOCK_K
MACs at ~15× the rate). It only wins when launch latency dominates: few tokens (M ≤ 64: time
embedding, modulation, text projections at batch 1–2). That is the dispatch rule below; it is
a design estimate, not yet measured on a GPU.

Exactness: quantization uses `div_rn` (IEEE division, as torch does), round-half-to-even via
the 1.5·2^23 trick on values clamped to ±2^22 (outside that range the clamp to [0, qmax]
decides anyway), and is compiled with FMA contraction off, so codes match the training
quantizer bit for bit.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    ClipArg,
    apply_transform,
    check_act_bits,
    check_linear_args,
    check_transform,
    has_transform,
    row_factors,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

FUSE_MAX_M = 64  # at most this many tokens: quantize inside the GEMM (one launch)
PHI_MAX_RANK = 64  # Φ ranks up to this run inside the kernels; larger ones in PyTorch


# ----------------------------------------------------------------------------------------------
# Shared device functions
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rne(v):
    """Round half to even in fp32 (torch.round), for |v| ≤ 2^22 — callers clamp to that range."""
    v = tl.minimum(tl.maximum(v, -4194304.0), 4194304.0)
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _row_qparams(rmin, rmax, lo, hi, QMAX: tl.constexpr):
    """Scale and integer zero point of each row, the training quantizer's fp32 operations."""
    xmin = rmin * lo
    xmax = rmax * hi
    s = tl.maximum(tl.math.div_rn(xmax - xmin, tl.full(xmax.shape, QMAX, tl.float32)), 1e-5)
    z = tl.minimum(tl.maximum(_rne(tl.math.div_rn(-xmin, s)), 0.0), QMAX)
    return s, z


@triton.jit
def _quantize(x, s, z, QMAX: tl.constexpr):
    """`clamp(round(x / s) + z, 0, qmax)` for a (rows, cols) tile; s, z are (rows,)."""
    v = _rne(tl.math.div_rn(x, s[:, None])) + z[:, None]
    return tl.minimum(tl.maximum(v, 0.0), QMAX)


@triton.jit
def _row_minmax(x_ptr, rows, row_mask, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rmin = tl.full([BLOCK_M], float("inf"), tl.float32)
    rmax = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_off = rows.to(tl.int64) * stride_xm
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        m = row_mask[:, None] & (cols[None, :] < K)
        xt = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        rmin = tl.minimum(rmin, tl.min(tl.where(m, xt, float("inf")), axis=1))
        rmax = tl.maximum(rmax, tl.max(tl.where(m, xt, float("-inf")), axis=1))
    return rmin, rmax


# ----------------------------------------------------------------------------------------------
# Input transform in registers: signs, blockwise fast Walsh–Hadamard transform, smoothing
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwht_tile(v, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ROT: tl.constexpr, LOG2: tl.constexpr):
    """Unnormalised WHT over each run of ROT consecutive columns of a (BLOCK_M, BLOCK_K) tile.

    Radix-2 butterflies in registers, stage h = 1, 2, 4, … (the reference's order, hence its
    rounding): view the blocks as (n, ROT/2, 2), split off the lowest index bit (the pairs k, k+1),
    `join(a + b, a − b)` and move that bit to the top (permute + reshape), a cyclic rotation
    of the index bits — after LOG2 stages every bit is back in place and stage j has paired the
    original bit j. No matmul, no shared-memory Hadamard tile.
    """
    NB: tl.constexpr = BLOCK_M * (BLOCK_K // ROT)
    HB: tl.constexpr = ROT // 2
    y = tl.reshape(v, [NB, ROT])
    for _ in tl.static_range(LOG2):
        a, b = tl.split(tl.reshape(y, [NB, HB, 2]))
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), [NB, ROT])
    return tl.reshape(y, [BLOCK_M, BLOCK_K])


@triton.jit
def _load_x(
    x_ptr,
    x_off,
    cols,
    m,
    sg_ptr,
    sm_ptr,
    K,
    ROT: tl.constexpr,  # 0: no rotation; else the Hadamard block (signs applied, FWHT if > 1)
    LOG2: tl.constexpr,
    SQRT_B: tl.constexpr,  # fp32(√ROT)
    SMOOTH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """A (BLOCK_M, BLOCK_K) fp32 tile of `x' = fwht(x · signs) / fp32(√b) / smooth` (zeros where masked)."""
    xt = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if ROT > 0:
        sg = tl.load(sg_ptr + cols, mask=cols < K, other=0.0)
        xt = xt * sg[None, :]
        if ROT > 1:
            xt = _fwht_tile(xt, BLOCK_M, BLOCK_K, ROT, LOG2)
            if LOG2 % 2 == 0:  # √b a power of two: the multiply is the exact division
                xt = xt * (1.0 / SQRT_B)
            else:
                xt = tl.math.div_rn(xt, tl.full(xt.shape, SQRT_B, tl.float32))
    if SMOOTH:
        sm = tl.load(sm_ptr + cols, mask=cols < K, other=1.0)
        xt = tl.math.div_rn(xt, tl.broadcast_to(sm[None, :], xt.shape))
    return xt


# ----------------------------------------------------------------------------------------------
# Per-token activation quantization (+ Φ down-projection)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _act_quant_kernel(
    x_ptr,
    lo_ptr,
    hi_ptr,
    q_ptr,
    scale_ptr,
    zero_ptr,
    qsum_ptr,
    pd_ptr,
    t_ptr,
    sg_ptr,
    sm_ptr,
    M,
    K,
    stride_xm,
    stride_qm,
    HALF,
    stride_pd,
    stride_tm,
    R,
    BITS: tl.constexpr,
    LAYOUT: tl.constexpr,  # 0: uint8 q; 1: int8 q - c_x; 2: int8 q - c_x, even k | odd k halves; 3: fp8 q - z_x
    PHI_R: tl.constexpr,  # 0, or Φ's rank padded to a power of two ≥ 16
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROT: tl.constexpr = 0,  # input transform (see _load_x); BLOCK_K must be a multiple of ROT
    LOG2: tl.constexpr = 0,
    SQRT_B: tl.constexpr = 1.0,
    SMOOTH: tl.constexpr = False,
    ONE_SWEEP: tl.constexpr = False,  # BLOCK_K ≥ K: the row is read (and transformed) once, kept in registers
):
    QMAX: tl.constexpr = 2**BITS - 1
    TRANSFORM: tl.constexpr = ROT > 0 or SMOOTH
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    lo = tl.load(lo_ptr + rows, mask=row_mask, other=1.0)
    hi = tl.load(hi_ptr + rows, mask=row_mask, other=1.0)
    if ONE_SWEEP:
        cols0 = tl.arange(0, BLOCK_K)
        m0 = row_mask[:, None] & (cols0[None, :] < K)
        x_off0 = rows.to(tl.int64) * stride_xm
        xrow = _load_x(x_ptr, x_off0, cols0, m0, sg_ptr, sm_ptr, K, ROT, LOG2, SQRT_B, SMOOTH, BLOCK_M, BLOCK_K)
        rmin = tl.min(tl.where(m0, xrow, float("inf")), axis=1)
        rmax = tl.max(tl.where(m0, xrow, float("-inf")), axis=1)
    elif TRANSFORM:  # the transform is recomputed in the second sweep (registers, not a buffer)
        rmin = tl.full([BLOCK_M], float("inf"), tl.float32)
        rmax = tl.full([BLOCK_M], float("-inf"), tl.float32)
        x_off0 = rows.to(tl.int64) * stride_xm
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            m = row_mask[:, None] & (cols[None, :] < K)
            xt = _load_x(x_ptr, x_off0, cols, m, sg_ptr, sm_ptr, K, ROT, LOG2, SQRT_B, SMOOTH, BLOCK_M, BLOCK_K)
            rmin = tl.minimum(rmin, tl.min(tl.where(m, xt, float("inf")), axis=1))
            rmax = tl.maximum(rmax, tl.max(tl.where(m, xt, float("-inf")), axis=1))
    else:
        rmin, rmax = _row_minmax(x_ptr, rows, row_mask, K, stride_xm, BLOCK_M, BLOCK_K)
    rmin = tl.where(row_mask, rmin, 0.0)
    rmax = tl.where(row_mask, rmax, 0.0)
    s, z = _row_qparams(rmin, rmax, lo, hi, QMAX)

    x_off = rows.to(tl.int64) * stride_xm
    q_off = rows.to(tl.int64) * stride_qm
    qsum = tl.zeros([BLOCK_M], tl.int32)
    if PHI_R > 0:
        rr = tl.arange(0, PHI_R)
        t_acc = tl.zeros([BLOCK_M, PHI_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        m = row_mask[:, None] & (cols[None, :] < K)
        if ONE_SWEEP:  # a single iteration (k0 = 0) over the row already in registers
            xt = xrow
        else:
            xt = _load_x(x_ptr, x_off, cols, m, sg_ptr, sm_ptr, K, ROT, LOG2, SQRT_B, SMOOTH, BLOCK_M, BLOCK_K)
        q = tl.where(m, _quantize(xt, s, z, QMAX), 0.0)
        qsum += tl.sum(q.to(tl.int32), axis=1)
        if LAYOUT == 0:
            tl.store(q_ptr + q_off[:, None] + cols[None, :], q.to(tl.uint8), mask=m)
        elif LAYOUT == 3:  # fp8 e4m3 codes q - z_x ∈ [-15, 15] (≤ 4 bits: exact in e4m3), for fp8_gemm
            tl.store(q_ptr + q_off[:, None] + cols[None, :], (q - z[:, None]).to(q_ptr.dtype.element_ty), mask=m)
        else:
            if BITS == 8:
                a = (q - 128.0).to(tl.int8)
            else:
                a = (q - z[:, None]).to(tl.int8)
            if LAYOUT == 1:
                tl.store(q_ptr + q_off[:, None] + cols[None, :], a, mask=m)
            else:  # even k | odd k halves, split in registers so both stores are contiguous
                a_e, a_o = tl.split(tl.reshape(a, [BLOCK_M, BLOCK_K // 2, 2]))
                hc = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                base = q_ptr + q_off[:, None] + hc[None, :]
                tl.store(base, a_e, mask=row_mask[:, None] & (2 * hc[None, :] < K))
                tl.store(base + HALF, a_o, mask=row_mask[:, None] & (2 * hc[None, :] + 1 < K))
        if PHI_R > 0:
            af = tl.where(m, q - z[:, None], 0.0)  # q_x - z_x, exact small integers
            pd_mask = (rr[None, :] < R) & (cols[:, None] < K)
            pd = tl.load(pd_ptr + rr[None, :] * stride_pd + cols[:, None], mask=pd_mask, other=0.0)
            t_acc = tl.dot(af.to(pd.dtype), pd, t_acc)
    tl.store(scale_ptr + rows, s, mask=row_mask)
    tl.store(zero_ptr + rows, z, mask=row_mask)
    tl.store(qsum_ptr + rows, qsum, mask=row_mask)
    if PHI_R > 0:
        t = t_acc * s[:, None]  # x̂ Rᵀ = s_x (q_x - z_x) Rᵀ
        tl.store(t_ptr + rows.to(tl.int64)[:, None] * stride_tm + rr[None, :], t, mask=row_mask[:, None])


# ----------------------------------------------------------------------------------------------
# The GEMM: int8 MMA (or float MMA for weight-only) + zero-point epilogue
# ----------------------------------------------------------------------------------------------
@triton.jit
def _quantize_t(x, s, z, QMAX: tl.constexpr):
    """`_quantize` for transposed tiles (k, rows) or (k, rows, 2): s, z broadcast along the rows axis."""
    if len(x.shape) == 3:
        v = _rne(tl.math.div_rn(x, s[None, :, None])) + z[None, :, None]
    else:
        v = _rne(tl.math.div_rn(x, s[None, :])) + z[None, :]
    return tl.minimum(tl.maximum(v, 0.0), QMAX)


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's token rows and output columns, in grouped order (L2 reuse of the weight
    tiles), plus copies clamped in bounds: loads need no masks, stores are masked."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols, tl.minimum(rows, M - 1), tl.minimum(cols, N - 1)


@triton.jit
def _linear_kernel(
    a_ptr,  # A_SRC=1: int8 activations from _act_quant_kernel; A_SRC=0/2: the float input x
    lo_ptr,
    hi_ptr,
    sx_ptr,
    zx_ptr,
    qsx_ptr,
    w_ptr,
    sw_ptr,
    zw_ptr,
    qsw_ptr,
    bias_ptr,
    t_ptr,
    pu_ptr,
    y_ptr,
    M,
    N,
    K,
    KH,  # ceil(K / 2): bytes per packed weight row; arguments, so they get divisibility hints
    KO,  # K // 2: odd-k count
    HALF,
    R,
    stride_am,
    stride_wn,
    stride_tm,
    stride_pun,
    stride_ym,
    M_BUCKET,  # autotuning key only
    W_BITS: tl.constexpr,
    W_PACKED: tl.constexpr,  # two 4-bit codes per byte; else one code per byte (widened)
    A_BITS: tl.constexpr,  # 0 for weight-only
    A_SRC: tl.constexpr,  # 0: float x (weight-only); 1: pre-quantized int8; 2: quantize x here (fused)
    HAS_BIAS: tl.constexpr,
    PHI_R: tl.constexpr,
    OUT_INT: tl.constexpr,  # testing: store the int32 Σ(q_x - z_x)(q_w - c_w) instead of y
    DOT_PREC: tl.constexpr,  # input precision of float dots (weight-only mode)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Computes the output tile transposed, `accᵀ (BLOCK_N × BLOCK_M) = W_tile · A_tileᵀ`.

    The weights are widened in registers, so they are the MMA's *first* operand: on Hopper
    wgmma takes operand A straight from registers (operand B must sit in shared memory), which
    saves a register → shared round trip of every unpacked weight tile; the activations arrive
    by cp.async in shared memory. Few tokens then map to the MMA's narrow N side (8…256).
    """
    PACKED: tl.constexpr = W_PACKED
    QMAX: tl.constexpr = 2**A_BITS - 1
    # integer path: c_w shifts 8-bit weight codes into int8; float path: centre the codes
    C_W: tl.constexpr = 128 if (W_BITS == 8 and A_SRC != 0) else (0 if A_SRC != 0 else 2 ** (W_BITS - 1))
    C_X8: tl.constexpr = A_BITS == 8
    BKH: tl.constexpr = BLOCK_K // 2

    rows, cols, rows_c, cols_c = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    a_row = rows_c.to(tl.int64) * stride_am
    w_col = cols_c.to(tl.int64) * stride_wn

    if A_SRC == 2:
        lo = tl.load(lo_ptr + rows_c)
        hi = tl.load(hi_ptr + rows_c)
        rmin, rmax = _row_minmax(a_ptr, rows_c, rows_c >= 0, K, stride_am, BLOCK_M, BLOCK_K)
        s_x, z_x = _row_qparams(rmin, rmax, lo, hi, QMAX)
        if C_X8:
            c_x = tl.full([BLOCK_M], 128.0, tl.float32)
        else:
            c_x = z_x
        rsum = tl.zeros([BLOCK_M], tl.int32)  # Σ(q_x - z_x)
    if A_SRC == 0:
        xsum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.int32)

    if PACKED:
        for kh0 in range(0, KH, BKH):
            offs_kh = tl.max_contiguous(tl.multiple_of(kh0 + tl.arange(0, BKH), BKH), BKH)
            p = tl.load(w_ptr + w_col[:, None] + offs_kh[None, :], mask=offs_kh[None, :] < KH, other=0)
            if A_SRC == 1:
                a_e = tl.load(a_ptr + a_row[None, :] + offs_kh[:, None], mask=offs_kh[:, None] < KH, other=0)
                a_o = tl.load(a_ptr + a_row[None, :] + HALF + offs_kh[:, None], mask=offs_kh[:, None] < KO, other=0)
                acc = tl.dot((p & 0xF).to(tl.int8), a_e, acc, out_dtype=tl.int32)
                acc = tl.dot((p >> 4).to(tl.int8), a_o, acc, out_dtype=tl.int32)
            else:
                # (BKH, BLOCK_M, 2) tile of x: the pair (2j, 2j+1) side by side, split in registers
                kk = 2 * offs_kh[:, None, None] + tl.arange(0, 2)[None, None, :]
                x3 = tl.load(a_ptr + a_row[None, :, None] + kk, mask=kk < K, other=0.0)
                if A_SRC == 2:
                    q3 = _quantize_t(x3.to(tl.float32), s_x, z_x, QMAX)
                    a3 = tl.where(kk < K, q3 - c_x[None, :, None], 0.0)
                    d3 = tl.where(kk < K, q3 - z_x[None, :, None], 0.0)
                    rsum += tl.sum(tl.sum(d3, axis=2), axis=0).to(tl.int32)
                    a_e, a_o = tl.split(a3.to(tl.int8))
                    acc = tl.dot((p & 0xF).to(tl.int8), a_e, acc, out_dtype=tl.int32)
                    acc = tl.dot((p >> 4).to(tl.int8), a_o, acc, out_dtype=tl.int32)
                else:
                    xsum += tl.sum(tl.sum(x3.to(tl.float32), axis=2), axis=0)
                    x_e, x_o = tl.split(x3)
                    w_lo = ((p & 0xF).to(tl.int16) - C_W).to(x3.dtype)
                    w_hi = ((p >> 4).to(tl.int16) - C_W).to(x3.dtype)
                    acc = tl.dot(w_lo, x_e, acc, input_precision=DOT_PREC)
                    acc = tl.dot(w_hi, x_o, acc, input_precision=DOT_PREC)
    else:
        for k0 in range(0, K, BLOCK_K):
            offs_k = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
            k_ok = offs_k < K
            p = tl.load(w_ptr + w_col[:, None] + offs_k[None, :], mask=k_ok[None, :], other=0)
            if A_SRC == 0:
                xt = tl.load(a_ptr + a_row[None, :] + offs_k[:, None], mask=k_ok[:, None], other=0.0)
                xsum += tl.sum(xt.to(tl.float32), axis=0)
                b = (p.to(tl.int16) - C_W).to(xt.dtype)
                acc = tl.dot(b, xt, acc, input_precision=DOT_PREC)
            else:
                if W_BITS == 8:
                    b = (p ^ 0x80).to(tl.int8, bitcast=True)  # q_w - 128
                    b = tl.where(k_ok[None, :], b, 0)
                else:
                    b = p.to(tl.int8)
                if A_SRC == 1:
                    a = tl.load(a_ptr + a_row[None, :] + offs_k[:, None], mask=k_ok[:, None], other=0)
                else:
                    xt = tl.load(a_ptr + a_row[None, :] + offs_k[:, None], mask=k_ok[:, None], other=0.0)
                    q = _quantize_t(xt.to(tl.float32), s_x, z_x, QMAX)
                    a = tl.where(k_ok[:, None], q - c_x[None, :], 0.0).to(tl.int8)
                    rsum += tl.sum(tl.where(k_ok[:, None], q - z_x[None, :], 0.0), axis=0).to(tl.int32)
                acc = tl.dot(b, a, acc, out_dtype=tl.int32)

    # ---- epilogue, on the transposed tile: dim 0 = output channels, dim 1 = tokens ----
    s_w = tl.load(sw_ptr + cols_c)
    z_w = tl.load(zw_ptr + cols_c)
    if A_SRC == 0:
        y = (acc + (C_W - z_w)[:, None] * xsum[None, :]) * s_w[:, None]
    else:
        if A_SRC == 1:
            s_x = tl.load(sx_ptr + rows_c)
            z_x = tl.load(zx_ptr + rows_c)
            rsum = tl.load(qsx_ptr + rows_c) - K * z_x.to(tl.int32)
        if C_X8:  # a = q_x - 128: add d_x Σ_k b = (128 - z_x)(Σ q_w - K c_w)
            s_b = tl.load(qsw_ptr + cols_c) - K * C_W
            acc += s_b[:, None] * (128 - z_x.to(tl.int32))[None, :]
        corr = (C_W - z_w)[:, None] * rsum.to(tl.float32)[None, :]  # the real weight zero point
        y = (acc.to(tl.float32) + corr) * (s_w[:, None] * s_x[None, :])
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols_c).to(tl.float32)[:, None]
    if PHI_R > 0:  # Φ's up-projection: yᵀ += L tᵀ
        rr = tl.arange(0, PHI_R)
        t = tl.load(t_ptr + rows_c.to(tl.int64)[None, :] * stride_tm + rr[:, None])
        pu = tl.load(pu_ptr + cols_c.to(tl.int64)[:, None] * stride_pun + rr[None, :], mask=rr[None, :] < R, other=0.0)
        y = tl.dot(pu, t.to(pu.dtype), y)
    out_mask = (cols[:, None] < N) & (rows[None, :] < M)
    y_ptrs = y_ptr + rows.to(tl.int64)[None, :] * stride_ym + cols[:, None]
    if OUT_INT:  # testing: the exact integer part, Σ(q_x - z_x)(q_w - c_w)
        tl.store(y_ptrs, acc, mask=out_mask)
    else:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _int_gemm_kernel(
    a_ptr,  # int8 activations from _act_quant_kernel (LAYOUT 2 for packed weights, else 1)
    lo_ptr,
    hi_ptr,
    sx_ptr,
    zx_ptr,
    qsx_ptr,
    w_ptr,
    sw_ptr,
    zw_ptr,
    qsw_ptr,
    bias_ptr,
    t_ptr,
    pu_ptr,
    y_ptr,
    M,
    N,
    K,
    KH,
    KO,
    HALF,
    R,
    stride_am,
    stride_wn,
    stride_tm,
    stride_pun,
    stride_ym,
    M_BUCKET,  # autotuning key only
    W_BITS: tl.constexpr,
    W_PACKED: tl.constexpr,  # two 4-bit codes per byte; else one code per byte (widened)
    A_BITS: tl.constexpr,
    A_SRC: tl.constexpr,  # always 1 here (same signature as _linear_kernel)
    HAS_BIAS: tl.constexpr,
    PHI_R: tl.constexpr,
    OUT_INT: tl.constexpr,
    DOT_PREC: tl.constexpr,  # unused (integer dots only)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Pre-quantized int8 activations × int4/int8 weights, output tile in natural orientation.

    `acc (BLOCK_M × BLOCK_N) = A_tile · W_tileᵀ` with the activations as the MMA's first operand
    (shared memory, K-major) and the widened weights second. Measured on an H100 (Triton 3.6,
    M = 32760): 650–800 TOPS, 3–5× the transposed orientation of `_linear_kernel`, whose
    register-sourced first operand did not reach wgmma's rate. Packed weights pair with the
    activations' even/odd halves (LAYOUT 2), so no interleave is needed in registers.
    """
    PACKED: tl.constexpr = W_PACKED
    C_W: tl.constexpr = 128 if W_BITS == 8 else 0
    C_X8: tl.constexpr = A_BITS == 8
    BKH: tl.constexpr = BLOCK_K // 2

    rows, cols, rows_c, cols_c = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    a_row = rows_c.to(tl.int64)[:, None] * stride_am
    w_col = cols_c.to(tl.int64)[None, :] * stride_wn

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    if PACKED:
        for kh0 in range(0, KH, BKH):
            offs = tl.max_contiguous(tl.multiple_of(kh0 + tl.arange(0, BKH), BKH), BKH)
            a_e = tl.load(a_ptr + a_row + offs[None, :], mask=offs[None, :] < KH, other=0)
            a_o = tl.load(a_ptr + a_row + HALF + offs[None, :], mask=offs[None, :] < KO, other=0)
            p = tl.load(w_ptr + w_col + offs[:, None], mask=offs[:, None] < KH, other=0)
            acc = tl.dot(a_e, (p & 0xF).to(tl.int8), acc, out_dtype=tl.int32)
            acc = tl.dot(a_o, (p >> 4).to(tl.int8), acc, out_dtype=tl.int32)
    else:
        for k0 in range(0, K, BLOCK_K):
            offs = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
            a = tl.load(a_ptr + a_row + offs[None, :], mask=offs[None, :] < K, other=0)
            p = tl.load(w_ptr + w_col + offs[:, None], mask=offs[:, None] < K, other=0)
            if W_BITS == 8:
                b = (p ^ 0x80).to(tl.int8, bitcast=True)  # q_w - 128
                b = tl.where(offs[:, None] < K, b, 0)
            else:
                b = p.to(tl.int8)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    # ---- epilogue: dim 0 = tokens, dim 1 = output channels ----
    s_w = tl.load(sw_ptr + cols_c)
    z_w = tl.load(zw_ptr + cols_c)
    s_x = tl.load(sx_ptr + rows_c)
    z_x = tl.load(zx_ptr + rows_c)
    rsum = tl.load(qsx_ptr + rows_c) - K * z_x.to(tl.int32)  # Σ(q_x - z_x)
    if C_X8:  # a = q_x - 128: add d_x Σ_k b = (128 - z_x)(Σ q_w - K c_w)
        s_b = tl.load(qsw_ptr + cols_c) - K * C_W
        acc += (128 - z_x.to(tl.int32))[:, None] * s_b[None, :]
    corr = rsum.to(tl.float32)[:, None] * (C_W - z_w)[None, :]  # the real weight zero point
    y = (acc.to(tl.float32) + corr) * (s_x[:, None] * s_w[None, :])
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols_c).to(tl.float32)[None, :]
    if PHI_R > 0:  # Φ's up-projection: y += t Lᵀ
        rr = tl.arange(0, PHI_R)
        t = tl.load(t_ptr + rows_c.to(tl.int64)[:, None] * stride_tm + rr[None, :])
        pu = tl.load(pu_ptr + cols_c.to(tl.int64)[None, :] * stride_pun + rr[:, None], mask=rr[:, None] < R, other=0.0)
        y = tl.dot(t.to(pu.dtype), pu, y)
    out_mask = (rows[:, None] < M) & (cols[None, :] < N)
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    if OUT_INT:
        tl.store(y_ptrs, acc, mask=out_mask)
    else:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------------
# Autotune configurations
# ----------------------------------------------------------------------------------------------
def cfg_for(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages
    )


# Pre-quantized int8 path (_int_gemm_kernel). Hopper (sm_90): 64-row warpgroup tiles, deep K
# steps, 228 KB of shared memory; the first two were the fastest measured on an H100 at 32k tokens
# (Wan-1.3B/14B shapes), the thin ones serve few tokens.
HOPPER_CONFIGS = [
    cfg_for(256, 128, 128, 8, 3),
    cfg_for(128, 128, 128, 4, 4),
    cfg_for(128, 256, 256, 8, 3),
    cfg_for(128, 128, 128, 8, 4),
    cfg_for(64, 128, 128, 4, 4),
    cfg_for(128, 64, 256, 4, 3),
    cfg_for(32, 64, 256, 4, 3),
    cfg_for(16, 128, 256, 8, 3),  # 4 warps spilled with widened weights (Triton 3.6)
]
# Ampere / Ada (sm_80, sm_86, sm_89): mma.sync m16n8k32 int8; 100–164 KB of shared memory. A 128×128
# int32 accumulator takes 128 registers per thread with 4 warps and spilled (Triton 3.9, sm_80), so
# big tiles use 8 warps; 128×256 and 256×128 spilled even then (tests/test_kernels_triton.py checks).
AMPERE_CONFIGS = [
    cfg_for(128, 128, 128, 8, 3),
    cfg_for(128, 128, 64, 8, 4),
    cfg_for(64, 256, 128, 8, 3),
    cfg_for(64, 128, 128, 4, 4),
    cfg_for(128, 64, 128, 4, 4),
    cfg_for(64, 64, 128, 4, 4),
    cfg_for(32, 64, 256, 4, 3),
    cfg_for(16, 128, 256, 4, 3),
]
# Fused quantize-in-GEMM (≤ FUSE_MAX_M tokens): thin M tiles; the float x tile sits in shared memory.
FUSED_CONFIGS = [
    cfg_for(16, 128, 128, 4, 3),
    cfg_for(16, 64, 256, 4, 3),
    cfg_for(32, 128, 128, 4, 3),
    cfg_for(64, 64, 128, 4, 3),
]
# Weight-only (float MMA on 16-bit inputs; fp32 inputs use the tf32x3 split): shallower K steps.
FLOAT_CONFIGS = [
    cfg_for(128, 128, 64, 8, 3),
    cfg_for(128, 64, 64, 4, 3),
    cfg_for(64, 128, 64, 4, 3),
    cfg_for(64, 64, 64, 4, 3),
    cfg_for(16, 128, 64, 4, 3),
]
# fixed tiles for the CPU interpreter (cost ∝ programs × K steps) and for explicit calls
INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}


def configs_for(a_src: int, hopper: bool) -> list[triton.Config]:
    """The autotune list of a kernel mode (A_SRC 0 weight-only, 1 int8, 2 fused) on an architecture."""
    if a_src == 0:
        return FLOAT_CONFIGS
    if a_src == 2:
        return FUSED_CONFIGS
    return HOPPER_CONFIGS if hopper else AMPERE_CONFIGS


def _prune(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (few tokens ⇒ thin M tiles)."""
    m = named_args["M"]
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))]
    small = [c for c in keep if m > 64 or c.kwargs["BLOCK_M"] <= 64]
    return small or keep or configs[-1:]


_KEY = ["M_BUCKET", "N", "K", "W_BITS", "W_PACKED", "A_BITS", "A_SRC", "PHI_R"]


def kernel_for(a_src: int):
    """The GEMM kernel of a mode: natural orientation for pre-quantized int8 activations (the
    many-token path), transposed for the fused and weight-only modes (few tokens on the MMA's N side)."""
    return _int_gemm_kernel if a_src == 1 else _linear_kernel


@functools.cache
def _tuned(a_src: int, hopper: bool):
    """One autotuner per (mode, architecture); the timings are cached per problem key."""
    return triton.autotune(configs_for(a_src, hopper), key=_KEY, prune_configs_by={"early_config_prune": _prune})(
        kernel_for(a_src)
    )


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def _phi_pad(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


ONE_SWEEP_ELEMS = 16384  # row tile held in registers: 64 KB of fp32 over 8 warps = 64 registers a thread


def quant_block(k: int, block_k: int | None = None) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K) of the two-sweep quantization kernel: 16 rows, K in steps of up to 256."""
    bk = block_k or min(256, max(16, triton.next_power_of_2(k)))
    return 16, bk


def one_sweep_block(k: int, rot: int = 0, layout: int = 1) -> tuple[int, int] | None:
    """(BLOCK_M, BLOCK_K = next_pow2(K)) when whole rows fit the register tile, else None.

    One sweep reads x once (and applies the input transform once) instead of twice: the pass is
    memory-bound, so it should take about half the time (issue #13; to be measured on a GPU).
    The in-register Hadamard butterflies and the fp8 stores need twice the room (16384-element
    tiles spilled on sm_90, Triton 3.9)."""
    elems = ONE_SWEEP_ELEMS // 2 if rot > 1 or layout == 3 else ONE_SWEEP_ELEMS
    bk = max(16, triton.next_power_of_2(k))
    if bk > elems:
        return None
    return min(16, elems // bk), bk


def launch_quant(
    x2d: Tensor,
    lo: Tensor,
    hi: Tensor,
    bits: int,
    layout: int,
    phi_down: Tensor | None = None,
    block: tuple[int, int] | None = None,
    transform: tuple[Tensor | None, int, Tensor | None] = (None, 0, None),
    one_sweep: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, int]:
    """Run `_act_quant_kernel`; returns (q buffer, scale, zero, qsum, t, HALF).

    One sweep (whole rows in registers) whenever K allows it and neither `block` nor Φ is given;
    `one_sweep` forces it on (error if impossible) or off (tests, benchmarks).

    `transform` = (signs float32 or None, rot_block, smooth float32 or None), from `check_transform`.
    """
    m, k = x2d.shape
    dev = x2d.device
    half = 0
    if layout == 0:
        q = torch.empty(m, k, dtype=torch.uint8, device=dev)
    elif layout in (1, 3):
        q = torch.empty(m, _round_up(k, 16), dtype=torch.int8 if layout == 1 else torch.float8_e4m3fn, device=dev)
    else:
        half = _round_up((k + 1) // 2, 16)  # 16-byte aligned halves
        q = torch.empty(m, 2 * half, dtype=torch.int8, device=dev)
    scale = torch.empty(m, dtype=torch.float32, device=dev)
    zero = torch.empty(m, dtype=torch.float32, device=dev)
    qsum = torch.empty(m, dtype=torch.int32, device=dev)
    phi_r, rank, t = 0, 0, None
    if phi_down is not None:
        rank = phi_down.shape[0]
        phi_r = _phi_pad(rank)
        t = torch.empty(m, phi_r, dtype=torch.float32, device=dev)
        phi_down = phi_down.contiguous()
    signs, rot, smooth = transform
    if signs is None:
        rot = 0
    one = one_sweep_block(k, rot, layout) if block is None and not phi_r and one_sweep is not False else None
    if one_sweep and one is None:
        raise ValueError(
            f"one sweep needs K ≤ {ONE_SWEEP_ELEMS} (½ with rotation or fp8) and no Φ (K={k}, rank {rank})"
        )
    bm, bk = one or block or quant_block(k)
    if phi_r and bm < 16:
        raise ValueError("Φ's dot needs BLOCK_M ≥ 16")
    if rot and bk % rot:
        raise ValueError(f"BLOCK_K={bk} must be a multiple of the Hadamard block {rot}")
    log2 = rot.bit_length() - 1 if rot else 0
    sqrt_b = float(torch.tensor(math.sqrt(rot or 1), dtype=torch.float32))  # fp32(√b), as torch divides
    grid = (triton.cdiv(m, bm),)
    _act_quant_kernel[grid](
        x2d,
        lo,
        hi,
        q,
        scale,
        zero,
        qsum,
        phi_down if phi_down is not None else scale,
        t if t is not None else scale,
        signs if signs is not None else scale,
        smooth if smooth is not None else scale,
        m,
        k,
        x2d.stride(0),
        q.stride(0),
        half,
        phi_down.stride(0) if phi_down is not None else 0,
        t.stride(0) if t is not None else 0,
        rank,
        BITS=bits,
        LAYOUT=layout,
        PHI_R=phi_r,
        BLOCK_M=bm,
        BLOCK_K=bk,
        ROT=rot,
        LOG2=log2,
        SQRT_B=sqrt_b,
        SMOOTH=smooth is not None,
        ONE_SWEEP=one is not None,
        num_warps=8 if one is not None else 4,
        enable_fp_fusion=False,
    )
    return q, scale, zero, qsum, t, half


def rows_of(x: Tensor) -> Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def quantize_activation(
    x: Tensor,
    clip_lo: ClipArg,
    clip_hi: ClipArg,
    bits: int,
    *,
    input_signs: Tensor | None = None,
    rot_block: int = 0,
    smooth: Tensor | None = None,
    block: tuple[int, int] | None = None,
    one_sweep: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The public `quantize_activation` on the Triton kernel (uint8 codes, natural layout)."""
    check_act_bits(bits)
    lead, k = x.shape[:-1], x.shape[-1]
    if k == 0:
        raise ValueError("cannot quantize rows of length 0")
    x2d = rows_of(x)
    lo = row_factors(clip_lo, lead, x.device)
    hi = row_factors(clip_hi, lead, x.device)
    tf = check_transform(k, input_signs, rot_block, smooth, x.device)
    q, s, z, qsum, _, _ = launch_quant(x2d, lo, hi, bits, layout=0, block=block, transform=tf, one_sweep=one_sweep)
    stat = (*lead, 1)
    return q.reshape(x.shape), s.reshape(stat), z.reshape(stat), qsum.reshape(stat)


@functools.cache
def _is_hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def quantized_linear(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    w_zero: Tensor,
    w_qsum: Tensor,
    bias: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """The public `quantized_linear` on the Triton kernels.

    Keyword arguments as `layer_stages`, which does the work: the quantization launch (unless the
    GEMM quantizes, or the layer is weight-only), then the GEMM launch.
    """
    stages = layer_stages(x, qweight, w_scale, w_zero, w_qsum, bias, **kwargs)
    return stages.run()


@dataclass
class LayerStages:
    """One layer call split into its launches, so that each can be timed alone (`qvgen.bench`).

    `quant()` launches the activation quantization and returns what the GEMM reads (None when the
    GEMM reads x itself: weight-only or fused); `gemm(staged)` launches the GEMM and returns y;
    `run()` is the whole call.
    """

    quant: Callable[[], tuple | None]
    gemm: Callable[[tuple | None], Tensor]

    def run(self) -> Tensor:
        return self.gemm(self.quant())


def layer_stages(
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
    fused: bool | None = None,
    config: dict | None = None,
    quant_block_size: tuple[int, int] | None = None,
    int_out: bool = False,
) -> LayerStages:
    """Checks the arguments of `quantized_linear` and prepares its launches.

    `fused` forces the quantize-in-GEMM variant on or off (default: on for ≤ FUSE_MAX_M tokens
    without Φ); `config` fixes the GEMM tiles instead of autotuning (tests, the interpreter);
    `int_out=True` returns the raw int32 `Σ(q_x - z_x)(q_w - c_w)` (c_w = 128 for 8-bit weights,
    else 0) for exact testing.
    An input transform (`input_signs`, `rot_block`, `smooth`) runs inside the quantization kernel
    (in-register butterflies); it always takes the unfused path (two launches), and in weight-only
    mode it runs in PyTorch before the GEMM.
    """
    check_linear_args(x, qweight, w_scale, w_zero, w_qsum, bias, in_features, w_bits, a_bits, phi_down, phi_up)
    out_dtype = out_dtype or x.dtype
    lead, k, n = x.shape[:-1], in_features, qweight.shape[0]
    tf = check_transform(k, input_signs, rot_block, smooth, x.device)
    transformed = has_transform(*tf)
    x2d = rows_of(x)
    if transformed and a_bits is None:  # weight-only: x̂ = x', computed once in PyTorch
        x2d = apply_transform(x2d, *tf).to(x2d.dtype)
        transformed = False
    m = x2d.shape[0]
    dev = x.device
    if m == 0:
        return LayerStages(lambda: None, lambda _: torch.empty(*lead, n, dtype=out_dtype, device=dev))
    qweight = qweight.contiguous()
    w_packed = w_bits <= 4 and qweight.shape[1] != k
    s_w = w_scale.reshape(n).float().contiguous()
    z_w = w_zero.reshape(n).float().contiguous()
    qs_w = w_qsum.reshape(n).to(torch.int32).contiguous()
    bias_t = bias.reshape(n).contiguous() if bias is not None else None
    if a_bits is None and int_out:
        raise ValueError("int_out needs quantized activations")

    phi_in_kernel = phi_down is not None and a_bits is not None and phi_down.shape[0] <= PHI_MAX_RANK
    if fused is None:
        fused = m <= FUSE_MAX_M and phi_down is None and not transformed
    if fused and phi_down is not None:
        raise ValueError("the fused variant has no Φ branch; use fused=False")
    if fused and transformed:
        raise ValueError("the fused variant has no input transform; use fused=False")

    dummy_f = s_w
    direct = (x2d, dummy_f, dummy_f, dummy_f, None, 0)  # (a_buf, s_x, z_x, Σq_x, t, HALF): x read by the GEMM
    lo = hi = dummy_f
    if a_bits is None:
        a_src = 0
    elif fused:
        a_src = 2
        lo = row_factors(clip_lo, lead, dev)
        hi = row_factors(clip_hi, lead, dev)
    else:
        a_src = 1
        lo_r = row_factors(clip_lo, lead, dev)
        hi_r = row_factors(clip_hi, lead, dev)
        layout = 2 if w_packed else 1
        phi_k = phi_down if phi_in_kernel else None

    def quant() -> tuple | None:
        if a_src != 1:
            return None
        return launch_quant(x2d, lo_r, hi_r, a_bits, layout, phi_k, quant_block_size, tf)

    phi_r = _phi_pad(phi_down.shape[0]) if phi_in_kernel else 0
    pu = phi_up.contiguous() if phi_r else None
    meta = dict(
        W_BITS=w_bits,
        W_PACKED=w_packed,
        A_BITS=a_bits or 0,
        A_SRC=a_src,
        HAS_BIAS=bias_t is not None,
        PHI_R=phi_r,
        OUT_INT=int_out,
        DOT_PREC="tf32x3" if x2d.dtype == torch.float32 else "tf32",
    )
    # exact quantization needs FMA contraction off where the GEMM quantizes (fused variant)
    opts = {"enable_fp_fusion": a_src != 2}
    if config is None and INTERPRET:
        config = INTERPRET_CONFIG

    def gemm(staged: tuple | None) -> Tensor:
        a_buf, sx, zx, qsx, t, half = staged if staged is not None else direct
        y = torch.empty(m, n, dtype=torch.int32 if int_out else out_dtype, device=dev)
        args = (
            a_buf, lo, hi, sx, zx, qsx, qweight, s_w, z_w, qs_w,
            bias_t if bias_t is not None else dummy_f,
            t if t is not None else dummy_f,
            pu if pu is not None else dummy_f,
            y, m, n, k, (k + 1) // 2, k // 2, half, phi_down.shape[0] if phi_r else 0,
            a_buf.stride(0), qweight.stride(0), t.stride(0) if t is not None else 0,
            pu.stride(0) if pu is not None else 0, y.stride(0), min(triton.next_power_of_2(m), 8192),
        )  # fmt: skip
        _launch_gemm(args, meta, opts, m, n, a_src, config, dev)
        if phi_down is not None and not phi_in_kernel:
            y = _phi_in_torch(y, x2d, lead, a_bits, clip_lo, clip_hi, phi_down, phi_up, tf, out_dtype)
        return y.reshape(*lead, n)

    return LayerStages(quant, gemm)


def _launch_gemm(args: tuple, meta: dict, opts: dict, m: int, n: int, a_src: int, config: dict | None, dev) -> None:
    """Launch the GEMM of mode `a_src` with fixed tiles (`config`) or through its autotuner."""
    if config is not None:
        cfg = dict(config)
        warps = cfg.pop("num_warps", 4)
        stages = cfg.pop("num_stages", 3)

        def grid(meta_: dict) -> tuple[int]:
            return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)

        kernel_for(a_src)[grid](*args, **meta, **cfg, num_warps=warps, num_stages=stages, **opts)
        return
    tuned = _tuned(a_src, _is_hopper(dev.index if dev.index is not None else torch.cuda.current_device()))

    def grid(meta_: dict) -> tuple[int]:
        return (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]),)

    tuned[grid](*args, **meta, **opts)


def _phi_in_torch(y, x2d, lead, a_bits, clip_lo, clip_hi, phi_down, phi_up, tf, out_dtype) -> Tensor:
    """Φ ranks above PHI_MAX_RANK (and weight-only Φ): `y + (x̂ Rᵀ) Lᵀ` in float32 PyTorch."""
    dev = x2d.device
    x_src = x2d.float()
    if a_bits is not None:  # x̂ = s_x (q_x - z_x), from the codes
        signs, rot, smooth = tf
        q, s, z, _ = quantize_activation(
            x2d, row_factors(clip_lo, lead, dev), row_factors(clip_hi, lead, dev), a_bits,
            input_signs=signs, rot_block=rot, smooth=smooth,
        )  # fmt: skip
        x_src = s * (q.float() - z)
    return (y.float() + (x_src @ phi_down.float().t()) @ phi_up.float().t()).to(out_dtype)
