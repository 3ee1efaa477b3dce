"""Why the fp8 GEMM (`qvgen_kernels.fp8_gemm`) is exact: an emulation of Hopper's fp8 accumulator.

Hopper's fp8 tensor-core MMA does not accumulate in full fp32: it keeps about 14 significant bits
(13 mantissa bits, "FP22": DeepSeek-V3 §3.3.2, SageAttention2 §3). The model here is at least as
lossy as that: after *every* product is added, the running sum is truncated toward zero to 14
significant bits. Integers of magnitude below 2^14 pass unchanged under any such rounding and any
grouping of the additions, so the kernel's scheme — a fresh partial sum per PROMOTE_K products,
added to an fp32 accumulator — is exact when every partial sum stays below 2^14, which the codes'
range guarantees (|q_x − z_x| ≤ 15, |q_w − 8| ≤ 8, 128 · 120 < 2^14). The tests check that, and
that the model does lose bits without promotion or with twice the interval (so it is not vacuous).
The kernel's own integer results are compared bit for bit with the reference in
test_kernels_interp.py (interpreter) and on a GPU in test_kernels_triton.py.
"""

from __future__ import annotations

import pytest
import qvgen_kernels as qk
import torch

fp8_gemm = pytest.importorskip("qvgen_kernels.fp8_gemm")  # imports triton

SIG_BITS = 14


def truncate_sig(v: torch.Tensor, bits: int = SIG_BITS) -> torch.Tensor:
    """Round float64 values toward zero to `bits` significant bits (exact for |v| < 2^bits integers)."""
    mant, exp = torch.frexp(v)  # v = mant · 2^exp, 0.5 ≤ |mant| < 1
    return torch.ldexp(torch.trunc(torch.ldexp(mant, torch.full_like(exp, bits))), exp - bits)


def emulate(a: torch.Tensor, b: torch.Tensor, promote_k: int | None) -> torch.Tensor:
    """Σ_k a_k b_k per row pair as the fp8 MMA would: lossy running sums, promoted every `promote_k`
    products into an fp32 accumulator (None: never promoted)."""
    k = a.shape[-1]
    prods = (a.double()[:, None, :] * b.double()[None, :, :]).reshape(-1, k)
    total = torch.zeros(prods.shape[0], dtype=torch.float32)
    part = torch.zeros(prods.shape[0], dtype=torch.float64)
    step = promote_k or k
    for j in range(k):
        part = truncate_sig(part + prods[:, j])
        if (j + 1) % step == 0 or j == k - 1:
            total = total + part.float()  # fp32 adds of integers, exact below 2^24
            part = torch.zeros_like(part)
    return total.reshape(a.shape[0], b.shape[0])


def exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() @ b.double().T).float()


def test_truncation_model_keeps_small_integers_and_drops_bits_above() -> None:
    v = torch.tensor([16383.0, -16383.0, 16385.0, 120.0 * 128])
    assert torch.equal(truncate_sig(v), torch.tensor([16383.0, -16383.0, 16384.0, 15360.0], dtype=torch.float64))


def test_worst_case_codes_are_exact_with_promotion_every_128() -> None:
    """Wan-14B's longest K (13824), codes at the range ends with one sign (the largest partial sums)
    and with odd products (105 = 15 · 7: odd sums, the first to lose bits)."""
    assert fp8_gemm.PROMOTE_K * 15 * 8 < 2**SIG_BITS
    k = 13824
    a = torch.tensor([[15.0] * k, [-15.0] * k, [15.0] * k])
    b = torch.tensor([[8.0] * k, [-8.0] * k, [7.0] * k])  # codes q_w − 8 ∈ [−8, 7]
    got = emulate(a, b, fp8_gemm.PROMOTE_K)
    assert torch.equal(got, exact(a, b))
    assert not torch.equal(emulate(a, b, None), exact(a, b))  # one running sum loses bits
    assert not torch.equal(emulate(a, b, 2 * fp8_gemm.PROMOTE_K), exact(a, b))  # so does a 256 interval


def test_random_codes_are_exact_with_promotion() -> None:
    g = torch.Generator().manual_seed(0)
    k = 4096
    a = torch.randint(-15, 16, (4, k), generator=g).float()
    b = torch.randint(-8, 8, (3, k), generator=g).float()
    assert torch.equal(emulate(a, b, fp8_gemm.PROMOTE_K), exact(a, b))


def test_codes_are_exact_in_e4m3() -> None:
    """Every code the kernels store is an e4m3 value: activations q − z, weights q − 8."""
    codes = torch.arange(-15, 16, dtype=torch.float32)
    assert torch.equal(codes.to(torch.float8_e4m3fn).float(), codes)
    q = torch.arange(16, dtype=torch.uint8).reshape(1, 16)
    for stored in (q, qk.pack_weight(q, 4)):  # widened and packed storage
        assert torch.equal(fp8_gemm.fp8_weight_codes(stored, 4, 16).float(), q.float() - 8)
