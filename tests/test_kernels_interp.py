"""Triton kernels under Triton's CPU interpreter, checked against the PyTorch reference.

`TRITON_INTERPRET` must be set before triton is first imported (it also decides how triton's
own library functions such as `tl.min` are built). In an ordinary pytest run this module
therefore contributes one test that re-runs this file in a fresh interpreter process with
`TRITON_INTERPRET=1`; there the real tests below run (and can be run directly:
`TRITON_INTERPRET=1 pytest tests/test_kernels_interp.py`).

Tolerances: integer codes, scales, zero points, row sums and the int32 GEMM accumulator are
compared exactly; float outputs use `test_kernels.assert_matches` (fp32: 2e-6·max|y| + 1e-5·|y|;
fp16: 2e-3·|y| + 1e-4·max|y|; bf16: 1.6e-2·|y| + 1e-3·max|y|). The Φ branch uses fp16/fp32
factors and weight-only mode fp16/fp32 inputs here: the interpreter's bf16 `tl.dot` is broken
(triton-lang/triton#11584); bf16 outputs and bf16 inputs to the integer path are tested.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytest.importorskip("triton")

if not INTERPRETING:

    def test_interpreter_suite() -> None:
        """Run this file again with the interpreter on; its failures are reported here."""
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        env.pop("QVGEN_KERNEL_BACKEND", None)
        cmd = [sys.executable, "-m", "pytest", __file__, "-o", "addopts=--import-mode=importlib", "-q", "--noconftest"]
        cmd += ["-p", "no:cacheprovider"]
        res = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True)
        tail = (res.stdout + res.stderr)[-6000:]
        assert res.returncode == 0, tail
        assert " passed" in res.stdout and " skipped" not in res.stdout, tail

else:
    from qvgen_kernels import reference
    from qvgen_kernels import triton_linear as tk
    from test_kernels import assert_matches, call, make_layer, transform_args

    def _tokens(m: int, k: int, dtype=torch.float32, seed: int = 0, huge: bool = False) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(m, k, generator=g) * 2
        if m > 4:
            x[1] = 0.0  # zero token
            x[2] = -2.5  # constant token
            x[3] = 100.0 + 1e-6 * torch.randn(k, generator=g)  # |x / s| far above 2^22
            x[4, :3] = 3e3 if dtype == torch.float16 else 3e4  # outliers (fp16 outputs must not overflow)
        if huge and m > 5:
            x[5] = 1e20 * torch.randn(k, generator=g)  # huge activations (exact-comparison tests only)
        return x.to(dtype)

    @pytest.mark.parametrize("one_sweep", [True, False], ids=["one-sweep", "two-sweep"])
    @pytest.mark.parametrize("bits", [2, 4, 8])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_interp_quantize_exact(bits: int, dtype: torch.dtype, one_sweep: bool) -> None:
        x = _tokens(37, 300, dtype, huge=dtype == torch.float32).reshape(1, 37, 300)
        for lo, hi in [(0.9025, 0.9025), (torch.rand(1, 37) * 0.3 + 0.6, 1.0), (torch.rand(1, 1) + 0.2, 0.5)]:
            got = tk.quantize_activation(x, lo, hi, bits, one_sweep=one_sweep)
            ref = reference.quantize_activation(x, lo, hi, bits)
            for g, r in zip(got, ref, strict=True):
                assert g.dtype == r.dtype and g.shape == r.shape
                assert torch.equal(g, r)

    def test_interp_quantize_small_blocks_and_single_token() -> None:
        x = _tokens(1, 45)
        got = tk.quantize_activation(x, 0.9, 0.9, 4, block=(16, 16))  # K spans 3 blocks, 1 valid row
        ref = reference.quantize_activation(x, 0.9, 0.9, 4)
        assert all(torch.equal(g, r) for g, r in zip(got, ref, strict=True))

    INT_CASES = [  # (w_bits, a_bits, M, K, N)
        (4, 4, 37, 200, 40),
        (4, 4, 1, 33, 13),  # single token, odd K, N not a multiple of 8
        (4, 8, 70, 130, 24),
        (8, 8, 37, 130, 40),
        (8, 4, 5, 64, 9),
        (3, 3, 20, 99, 16),
        (6, 6, 20, 77, 16),
        (2, 2, 16, 256, 64),
    ]

    @pytest.mark.parametrize(("w_bits", "a_bits", "m", "k", "n"), INT_CASES)
    @pytest.mark.parametrize("fused", [False, True])
    def test_interp_integer_part_exact(w_bits: int, a_bits: int, m: int, k: int, n: int, fused: bool) -> None:
        layer = make_layer(n, k, w_bits, seed=m + k)
        x = _tokens(m, k, seed=k, huge=True)
        lo = torch.rand(m) * 0.3 + 0.6
        acc = call(tk.quantized_linear, x, layer, k, w_bits, a_bits, clip_lo=lo, clip_hi=0.9, fused=fused, int_out=True)
        q, _, z, _ = reference.quantize_activation(x, lo, 0.9, a_bits)
        expect = reference.integer_dot(q, z, layer["q"], 128 if w_bits == 8 else 0)
        assert acc.dtype == torch.int32
        assert torch.equal(acc.long(), expect)

    @pytest.mark.parametrize(("w_bits", "a_bits", "rank"), [(4, 4, 0), (4, 8, 0), (2, 4, 4)])
    @pytest.mark.parametrize("fused", [False, True])
    def test_interp_widened_weights_equal_packed(w_bits: int, a_bits: int, rank: int, fused: bool) -> None:
        """One code per byte (the faster GPU layout) gives the packed layout's exact integers and outputs."""
        m, k, n = 37, 130, 24
        layer = make_layer(n, k, w_bits, rank=rank, seed=5)
        wide = {**layer, "qweight": layer["q"].clone()}
        x = _tokens(m, k)
        fused = fused and not rank
        kw = dict(clip_lo=0.9, clip_hi=0.85, fused=fused)
        acc = call(tk.quantized_linear, x, wide, k, w_bits, a_bits, int_out=True, **kw)
        assert torch.equal(acc, call(tk.quantized_linear, x, layer, k, w_bits, a_bits, int_out=True, **kw))
        y = call(tk.quantized_linear, x, wide, k, w_bits, a_bits, **kw)
        y_ref = call(reference.quantized_linear, x, layer, k, w_bits, a_bits, clip_lo=0.9, clip_hi=0.85)
        assert_matches(y, y_ref, torch.float32)

    @pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize(("w_bits", "a_bits"), [(4, 4), (4, 8), (8, 8)])
    @pytest.mark.parametrize("fused", [False, True])
    def test_interp_linear_outputs(out_dtype: torch.dtype, w_bits: int, a_bits: int, fused: bool) -> None:
        m, k, n = 37, 130, 24
        layer = make_layer(n, k, w_bits, seed=3)
        if out_dtype == torch.float16:
            layer["bias"] = None
        x = _tokens(m, k, out_dtype)
        y = call(tk.quantized_linear, x, layer, k, w_bits, a_bits, clip_lo=0.9, clip_hi=0.85, fused=fused)
        y_ref = call(
            reference.quantized_linear, x, layer, k, w_bits, a_bits, clip_lo=0.9, clip_hi=0.85, out_dtype=torch.float64
        )
        assert y.shape == (m, n)
        assert_matches(y, y_ref, out_dtype)

    @pytest.mark.parametrize(("rank", "phi_dtype"), [(4, torch.float32), (32, torch.float16), (70, torch.float32)])
    def test_interp_phi_branch(rank: int, phi_dtype: torch.dtype) -> None:
        """Φ in the kernels (rank ≤ 64: down-projection in the quantizer, up-projection in the epilogue)."""
        b, l, k, n = 2, 20, 96, 40
        layer = make_layer(n, k, 4, rank=rank, phi_dtype=phi_dtype)
        x = torch.randn(b, l, k) * 2
        lo = torch.rand(b, 1) * 0.3 + 0.6  # per-sample timestep bucket
        y = call(tk.quantized_linear, x, layer, k, 4, 4, clip_lo=lo, clip_hi=0.9)
        y_ref = call(reference.quantized_linear, x, layer, k, 4, 4, clip_lo=lo, clip_hi=0.9, out_dtype=torch.float64)
        no_phi = call(
            reference.quantized_linear, x, {**layer, "phi_down": None, "phi_up": None}, k, 4, 4, clip_lo=lo, clip_hi=0.9
        )
        assert y.shape == (b, l, n)
        if phi_dtype == torch.float32:
            assert_matches(y, y_ref, torch.float32)
        else:  # t = x̂ Rᵀ is rounded to the factors' dtype before the up-projection: 2^-10 of the Φ term
            phi_term = (y_ref - no_phi.double()).abs().max()
            assert (y.double() - y_ref).abs().max() <= 2e-6 * y_ref.abs().max() + 2**-10 * phi_term
        assert (y_ref - no_phi.double()).abs().max() > 1e-3  # the branch matters in this test

    @pytest.mark.parametrize(
        ("w_bits", "dtype"), [(4, torch.float32), (4, torch.float16), (8, torch.float32), (5, torch.float16)]
    )
    def test_interp_weight_only(w_bits: int, dtype: torch.dtype) -> None:
        m, k, n = 37, 77, 24
        layer = make_layer(n, k, w_bits, rank=3)
        x = _tokens(m, k, dtype) / 10
        y = call(tk.quantized_linear, x, layer, k, w_bits, None)
        y_ref = call(reference.quantized_linear, x, layer, k, w_bits, None, out_dtype=torch.float64)
        assert_matches(y, y_ref, dtype)

    def test_interp_fused_rejects_phi() -> None:
        layer = make_layer(8, 32, 4, rank=2)
        with pytest.raises(ValueError, match="fused"):
            call(tk.quantized_linear, torch.randn(2, 32), layer, 32, 4, 4, fused=True)

    def test_public_api_routes_to_triton(monkeypatch: pytest.MonkeyPatch) -> None:
        """backend="triton" (or the env var) reaches the kernels; the interpreter allows CPU tensors."""
        import qvgen_kernels as qk

        layer = make_layer(16, 64, 4)
        x = torch.randn(3, 64)
        calls = []
        real = tk.launch_quant
        monkeypatch.setattr(tk, "launch_quant", lambda *a, **k: calls.append(1) or real(*a, **k))
        assert "triton" in qk.available_backends()
        q = qk.quantize_activation(x, 0.9, 0.9, 4, backend="triton")
        assert calls == [1]
        monkeypatch.setenv(qk.ENV_VAR, "triton")
        assert qk.resolve_backend("auto", "cpu") == "triton"
        q_env = qk.quantize_activation(x, 0.9, 0.9, 4)
        assert calls == [1, 1]
        assert all(torch.equal(a, b) for a, b in zip(q, q_env, strict=True))
        y = call(qk.quantized_linear, x, layer, 64, 4, 4)
        y_ref = call(reference.quantized_linear, x, layer, 64, 4, 4, out_dtype=torch.float64)
        assert_matches(y, y_ref, torch.float32)

    # input transform in the quantization kernel: signs, in-register FWHT, smoothing
    INTERP_TRANSFORMS = [  # (kind, block, K): K a multiple of the block, not always a power of two
        ("rot", 2, 64),
        ("rot", 8, 200),
        ("rot", 32, 96),
        ("rot", 64, 320),
        ("smooth", 0, 77),
        ("both", 16, 48),
        ("both", 128, 384),
        ("both", 256, 512),
    ]

    @pytest.mark.parametrize("one_sweep", [True, False], ids=["one-sweep", "two-sweep"])
    @pytest.mark.parametrize(("kind", "block", "k"), INTERP_TRANSFORMS)
    def test_interp_transform_quantize_exact(kind: str, block: int, k: int, one_sweep: bool) -> None:
        """Codes, scales, zeros and sums equal the reference bit for bit (same fp32 operations),
        with the row read and transformed once (one sweep) or twice (two sweeps over K)."""
        tf = transform_args(k, kind, block, seed=k)
        x = _tokens(37, k, torch.bfloat16 if kind == "both" else torch.float32, seed=block)
        lo = torch.rand(37) * 0.3 + 0.6
        got = tk.quantize_activation(x, lo, 0.9, 4, **tf, one_sweep=one_sweep)
        ref = reference.quantize_activation(x, lo, 0.9, 4, **tf)
        for g, r in zip(got, ref, strict=True):
            assert g.dtype == r.dtype and g.shape == r.shape
            assert torch.equal(g, r)

    # (4, 8, 0): a layer given 8-bit inputs in a W4A4 model (layer_act_bits), packed 4-bit weights
    @pytest.mark.parametrize(("w_bits", "a_bits", "rank"), [(4, 4, 0), (4, 4, 8), (4, 8, 0), (8, 8, 0), (4, None, 0)])
    def test_interp_linear_with_transform(w_bits: int, a_bits: int | None, rank: int) -> None:
        """The GEMM after the transformed quantization: exact integer part, outputs within fp32 tolerance."""
        m, k, n = 20, 96, 40  # few tokens: the transform must route around the fused variant
        layer = make_layer(n, k, w_bits, rank=rank, seed=5)
        tf = transform_args(k, "both", 32, seed=1)
        x = _tokens(m, k, seed=2)
        y = call(tk.quantized_linear, x, layer, k, w_bits, a_bits, clip_lo=0.9, clip_hi=0.95, **tf)
        y_ref = call(
            reference.quantized_linear, x, layer, k, w_bits, a_bits, clip_lo=0.9, clip_hi=0.95,
            out_dtype=torch.float64, **tf,
        )  # fmt: skip
        assert_matches(y, y_ref, torch.float32)
        if a_bits is not None and rank == 0:  # the int32 accumulator on the transformed codes
            acc = call(tk.quantized_linear, x, layer, k, w_bits, a_bits, clip_lo=0.9, clip_hi=0.95, int_out=True, **tf)
            q, _, z, _ = reference.quantize_activation(x, 0.9, 0.95, a_bits, **tf)
            assert torch.equal(acc.long(), reference.integer_dot(q, z, layer["q"], 128 if w_bits == 8 else 0))
        if a_bits is not None and rank == 0:  # the fused variant has no transform: refused when forced
            with pytest.raises(ValueError, match="no input transform"):
                call(tk.quantized_linear, x, layer, k, w_bits, a_bits, fused=True, **tf)

    @pytest.mark.parametrize(("m", "k", "n"), [(37, 256, 40), (1, 160, 24), (70, 300, 16)])
    def test_interp_fp8_gemm_exact(m: int, k: int, n: int) -> None:
        """The fp8 route: codes as e4m3, fresh partial sums per K step; the integer part bit-identical
        to the reference's exact dot, the layer output within the fp32 tolerance."""
        from qvgen_kernels import fp8_gemm

        layer = make_layer(n, k, 4, seed=m)
        x = _tokens(m, k, seed=k)
        w8 = fp8_gemm.fp8_weight_codes(layer["qweight"], 4, k)
        args = (x, w8, layer["w_scale"], layer["w_zero"], layer["w_qsum"], layer["bias"])
        kw = dict(in_features=k, clip_lo=0.9, clip_hi=0.9)
        got = fp8_gemm.fp8_linear(*args, **kw, int_out=True)
        q, _, z, _ = reference.quantize_activation(x, 0.9, 0.9, 4)
        assert torch.equal(got.long(), reference.integer_dot(q, z, layer["q"], c_w=fp8_gemm.W_CENTER))
        y = fp8_gemm.fp8_linear(*args, **kw)
        y_ref = call(reference.quantized_linear, x, layer, k, 4, 4, clip_lo=0.9, clip_hi=0.9, out_dtype=torch.float64)
        assert_matches(y, y_ref, torch.float32)

    def test_interp_bench_fp8_variant_matches_w4a4() -> None:
        """`bench step --variants w4a4-fp8`: the reduced Wan with its PackedLinears on the fp8 GEMM
        gives the W4A4 model's output (same integers; epilogue rounding and bf16 activations differ,
        so the relative L2 gap is bounded as in test_gpu.py: ≤ 1e-2, a wrong zero point gives > 1e-1)."""
        pytest.importorskip("diffusers")
        from qvgen.bench.step import CASES, WAN_CONFIGS, Fp8Linear, build_model

        cpu = torch.device("cpu")
        torch.manual_seed(0)
        ref_model = build_model("reduced", "w4a4", cpu, torch.float32)
        torch.manual_seed(0)
        fp8_model = build_model("reduced", "w4a4-fp8", cpu, torch.float32)
        assert sum(isinstance(m, Fp8Linear) for m in fp8_model.modules()) >= 20  # 10 per block, 2 blocks
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, *CASES["cpu"], generator=g)
        e = torch.randn(1, 8, WAN_CONFIGS["reduced"]["text_dim"], generator=g)
        t = torch.tensor([500.0])
        with torch.inference_mode():
            ref = ref_model(x, t, e, return_dict=False)[0]
            got = fp8_model(x, t, e, return_dict=False)[0]
        assert float((got - ref).norm() / ref.norm()) <= 1e-2
