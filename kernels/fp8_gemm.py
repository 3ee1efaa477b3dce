"""W4A4 GEMM on fp8 (e4m3) tensor cores, exact: the Hopper route of issue #13 (experimental).

Why fp8: on sm_90 Triton lowers int8 dots to `wgmma … s32.s8.s8` and waits for each one before
the next K step (`wait_group 0`), while fp8 dots get the 64×256 instruction and normal pipelining.
The 4-bit codes are exact in e4m3: activations `q_x − z_x ∈ [−15, 15]`, weights `q_w − 8 ∈ [−8, 7]`.

Why promotion: Hopper's fp8 MMA accumulates in about 14 significant bits (a 13-bit-mantissa
"FP22", reported by DeepSeek-V3 and SageAttention2), not fp32. Products are at most 15·8 = 120,
so a partial sum over PROMOTE_K ≤ 128 products stays below 2^14 and is exact; each K step starts
a fresh accumulator and adds it to an fp32 one, exact while |Σ| ≤ 120·K < 2^24 (K < 139,810).
`tests/test_kernels_fp8.py` checks this bound against an emulation of that accumulator.

The cost (measured only on CPU, by compiling for sm_90 with Triton 3.9): the fresh-accumulator
add reads the MMA's result, so the loop waits for it (`wait_group 0`) every K step — the same
serialization as the int8 kernel, only with wider MMAs. Overlap needs two accumulators in
flight (Gluon's explicit `warpgroup_mma_wait(1)`), which plain Triton does not express.

Operands come straight from memory (no unpacking in the loop, so no shared-memory stores between
MMAs): the activations as fp8 codes from `_act_quant_kernel` (LAYOUT 3), the weights as fp8
codes prepared once (`fp8_weight_codes`, one byte per code like `qvgen.widen`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import ClipArg, check_linear_args, row_factors
from .packing import unpack_weight
from .triton_linear import INTERPRET, cfg_for, launch_quant, output_tile, rows_of

PROMOTE_K = 128  # K products per fp8 partial sum: 128 · 15 · 8 = 15360 < 2^14
W_CENTER = 8  # weight codes are stored as q_w − 8


@triton.jit
def _fp8_gemm_kernel(
    a_ptr,  # fp8 e4m3 q_x − z_x, (M, ≥K)
    sx_ptr,
    zx_ptr,
    qsx_ptr,
    w_ptr,  # fp8 e4m3 q_w − 8, (N, K)
    sw_ptr,
    zw_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_ym,
    M_BUCKET,  # autotuning key only
    HAS_BIAS: tl.constexpr,
    OUT_INT: tl.constexpr,  # testing: store the exact Σ(q_x − z_x)(q_w − 8) as int32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # ≤ PROMOTE_K: one fresh fp8 partial sum per K step
    GROUP_M: tl.constexpr,
):
    rows, cols, rows_c, cols_c = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    a_row = rows_c.to(tl.int64)[:, None] * stride_am
    w_col = cols_c.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
        a = tl.load(a_ptr + a_row + offs[None, :], mask=offs[None, :] < K, other=0.0)
        b = tl.load(w_ptr + w_col + offs[:, None], mask=offs[:, None] < K, other=0.0)
        acc += tl.dot(a, b)  # fresh partial sum (exact: |Σ| < 2^14), promoted to fp32 (exact: < 2^24)

    s_w = tl.load(sw_ptr + cols_c)
    z_w = tl.load(zw_ptr + cols_c)
    s_x = tl.load(sx_ptr + rows_c)
    z_x = tl.load(zx_ptr + rows_c)
    rsum = tl.load(qsx_ptr + rows_c) - K * z_x.to(tl.int32)  # Σ(q_x − z_x)
    corr = rsum.to(tl.float32)[:, None] * (8.0 - z_w)[None, :]  # the real weight zero point
    y = (acc + corr) * (s_x[:, None] * s_w[None, :])
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols_c).to(tl.float32)[None, :]
    out_mask = (rows[:, None] < M) & (cols[None, :] < N)
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    if OUT_INT:
        tl.store(y_ptrs, acc.to(tl.int32), mask=out_mask)
    else:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=out_mask)


# sm_90: 64-row warpgroup tiles; BLOCK_K is the promotion interval (≤ PROMOTE_K). The partial sum
# doubles the accumulator registers: 64×256 per warpgroup, or 128×128 on 4 warps, spill (Triton 3.9).
FP8_CONFIGS = [
    cfg_for(128, 128, 128, 8, 4),
    cfg_for(128, 128, 128, 8, 5),
    cfg_for(64, 128, 128, 4, 4),
    cfg_for(64, 64, 128, 4, 4),
]
INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}


@functools.cache
def _tuned():
    return triton.autotune(FP8_CONFIGS, key=["M_BUCKET", "N", "K"])(_fp8_gemm_kernel)


def fp8_weight_codes(qweight: Tensor, w_bits: int, in_features: int) -> Tensor:
    """Packed (or widened) ≤4-bit weight codes as fp8 e4m3 `q_w − 8`, (N, K): prepare once per layer."""
    if w_bits > 4:
        raise ValueError(f"the fp8 GEMM takes ≤ 4-bit weights (codes − 8 exact in e4m3), got w_bits={w_bits}")
    q = unpack_weight(qweight, w_bits, in_features)
    return (q.to(torch.int16) - W_CENTER).to(torch.float32).to(torch.float8_e4m3fn).contiguous()


def fp8_linear(
    x: Tensor,
    w_fp8: Tensor,
    w_scale: Tensor,
    w_zero: Tensor,
    w_qsum: Tensor,
    bias: Tensor | None = None,
    *,
    in_features: int,
    a_bits: int = 4,
    clip_lo: ClipArg = 1.0,
    clip_hi: ClipArg = 1.0,
    out_dtype: torch.dtype | None = None,
    config: dict | None = None,
    int_out: bool = False,
) -> Tensor:
    """`quantized_linear` for W4A4 (≤ 4-bit both) on the fp8 GEMM; `w_fp8` from `fp8_weight_codes`.

    No Φ and no input transform (yet). `int_out=True` returns the exact int32 Σ(q_x − z_x)(q_w − 8).
    """
    n, k = w_fp8.shape
    if w_fp8.dtype != torch.float8_e4m3fn or k != in_features:
        got = f"{w_fp8.dtype} {tuple(w_fp8.shape)}"
        raise ValueError(f"w_fp8 must be float8_e4m3fn of shape (N, {in_features}) (fp8_weight_codes), got {got}")
    if not 2 <= a_bits <= 4:
        raise ValueError(f"the fp8 GEMM takes ≤ 4-bit activations (q − z exact in e4m3), got a_bits={a_bits}")
    codes = torch.empty(n, in_features, dtype=torch.uint8, device="meta")  # stands in for the fp8 codes
    check_linear_args(x, codes, w_scale, w_zero, w_qsum, bias, in_features, 4, a_bits, None, None)
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2d = rows_of(x)
    m = x2d.shape[0]
    lo, hi = row_factors(clip_lo, lead, x.device), row_factors(clip_hi, lead, x.device)
    a, s_x, z_x, qs_x, _, _ = launch_quant(x2d, lo, hi, a_bits, 3)
    y = torch.empty(m, n, dtype=torch.int32 if int_out else out_dtype, device=x.device)
    s_w = w_scale.reshape(n).float().contiguous()
    bias_t = bias.reshape(n).contiguous() if bias is not None else s_w
    args = (a, s_x, z_x, qs_x, w_fp8, s_w, w_zero.reshape(n).float().contiguous(), bias_t, y)
    args += (m, n, k, a.stride(0), w_fp8.stride(0), y.stride(0), min(triton.next_power_of_2(max(m, 1)), 8192))
    meta = {"HAS_BIAS": bias is not None, "OUT_INT": int_out}
    if config is None and INTERPRET:
        config = INTERPRET_CONFIG
    if config is not None:
        cfg = dict(config)
        warps, stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 3)
        if cfg["BLOCK_K"] > PROMOTE_K:
            raise ValueError(f"BLOCK_K={cfg['BLOCK_K']} exceeds the exact promotion interval {PROMOTE_K}")
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _fp8_gemm_kernel[grid](*args, **meta, **cfg, num_warps=warps, num_stages=stages)
    else:

        def grid(meta_: dict) -> tuple[int]:
            return (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]),)

        _tuned()[grid](*args, **meta)
    return y.reshape(*lead, n)
