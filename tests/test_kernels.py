"""qvgen_kernels on CPU: packing, backend selection, the reference against the training quantizer,
and the fast CPU path against the reference.

Tolerances (outputs compared in float64 against `reference.quantized_linear`):
- integer codes, scales, zero points and row sums: exact (bit for bit);
- float32 outputs: |Δ| ≤ 2e-6 · max|y_ref| + 1e-5 · |y_ref| (measured ≈ 1e-7 relative);
- float16 outputs: one fp16 rounding each side, |Δ| ≤ 2e-3 · |y_ref| + 1e-4 · max|y_ref|;
- bfloat16 outputs: |Δ| ≤ 1.6e-2 · |y_ref| + 1e-3 · max|y_ref|.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import qvgen_kernels as qk
import torch
from qvgen_kernels import cpu, reference

TOL = {
    torch.float32: (1e-5, 2e-6),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}


def assert_matches(y: torch.Tensor, y_ref: torch.Tensor, dtype: torch.dtype) -> None:
    """`y` (any float dtype) against a float64 reference, with the tolerance of `dtype`."""
    assert y.dtype == dtype
    rtol, atol_rel = TOL[dtype]
    y64, r64 = y.double(), y_ref.double()
    assert torch.isfinite(y64).all()
    err = (y64 - r64).abs()
    bound = atol_rel * r64.abs().max() + rtol * r64.abs()
    worst = (err - bound).max()
    assert worst <= 0, f"max error {err.max().item():.3g} exceeds the {dtype} tolerance"


def make_layer(n: int, k: int, w_bits: int, rank: int = 0, seed: int = 0, phi_dtype=torch.float32):
    """Random packed layer: codes, real zero points, scales, bias and optionally Φ."""
    g = torch.Generator().manual_seed(seed)
    qmax = 2**w_bits - 1
    q = torch.randint(0, qmax + 1, (n, k), generator=g, dtype=torch.uint8)
    layer = {
        "q": q,
        "qweight": qk.pack_weight(q, w_bits),
        "w_scale": torch.rand(n, generator=g) * 0.02 + 1e-3,
        "w_zero": torch.rand(n, generator=g) * qmax,  # real-valued, LSQ+
        "w_qsum": q.to(torch.int32).sum(dim=1).to(torch.int32),
        "bias": torch.randn(n, generator=g),
        "phi_down": None,
        "phi_up": None,
    }
    if rank:
        layer["phi_down"] = (torch.randn(rank, k, generator=g) * 0.05).to(phi_dtype)
        layer["phi_up"] = (torch.randn(n, rank, generator=g) * 0.05).to(phi_dtype)
    return layer


def call(fn, x, layer, k, w_bits, a_bits, **kw):
    return fn(
        x,
        layer["qweight"],
        layer["w_scale"],
        layer["w_zero"],
        layer["w_qsum"],
        layer["bias"],
        in_features=k,
        w_bits=w_bits,
        a_bits=a_bits,
        phi_down=layer["phi_down"],
        phi_up=layer["phi_up"],
        **kw,
    )


# ---------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("k", [1, 6, 7, 33])
def test_pack_round_trip(bits: int, k: int) -> None:
    q = torch.randint(0, 2**bits, (5, k), dtype=torch.uint8)
    packed = qk.pack_weight(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, (k + 1) // 2 if bits <= 4 else k) == (5, qk.packed_width(k, bits))
    assert torch.equal(qk.unpack_weight(packed, bits, k), q)


def test_pack_nibble_order_and_padding() -> None:
    q = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8)
    packed = qk.pack_weight(q, 4)
    assert packed.tolist() == [[0x21, 0x43, 0x05]]  # k=2j low nibble, k=2j+1 high, odd K padded with 0


def test_pack_rejects_out_of_range_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        qk.pack_weight(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="integers"):
        qk.pack_weight(torch.tensor([[1.5]]), 4)
    with pytest.raises(ValueError, match="2..8"):
        qk.pack_weight(torch.zeros(2, 2, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="need 4"):
        qk.unpack_weight(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)


# ---------------------------------------------------------------------------------------------
# backend selection
# ---------------------------------------------------------------------------------------------
def test_resolve_backend_auto_and_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(qk.ENV_VAR, raising=False)
    assert qk.resolve_backend("auto", "cpu") == "cpu"
    assert qk.resolve_backend("torch", "cpu") == "torch"
    assert qk.resolve_backend("CPU", torch.device("cpu")) == "cpu"
    assert {"torch", "cpu"} <= set(qk.available_backends())


def test_env_var_overrides_auto_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(qk.ENV_VAR, "torch")
    assert qk.resolve_backend("auto", "cpu") == "torch"
    assert qk.resolve_backend("cpu", "cpu") == "cpu"  # an explicit argument wins
    monkeypatch.setenv(qk.ENV_VAR, "cuda-fast")
    with pytest.raises(ValueError, match=r"QVGEN_KERNEL_BACKEND.*auto, triton, cpu, torch"):
        qk.resolve_backend("auto", "cpu")


def test_unknown_backend_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(qk.ENV_VAR, raising=False)
    with pytest.raises(ValueError, match=r"'nope'.*auto, triton, cpu, torch"):
        qk.resolve_backend("nope", "cpu")
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="allowed values"):
        qk.quantize_activation(x, 1.0, 1.0, 4, backend="nope")


def test_triton_backend_refuses_cpu_tensors_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA|triton"):
        qk.resolve_backend("triton", "cpu")


def test_env_var_routes_the_public_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """The env var really changes which code runs (the reference never calls cpu.int_matmul)."""
    layer = make_layer(8, 16, 4)
    x = torch.randn(3, 16)
    calls = []
    real = cpu.int_matmul
    monkeypatch.setattr(cpu, "int_matmul", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv(qk.ENV_VAR, "torch")
    call(qk.quantized_linear, x, layer, 16, 4, 4)
    assert calls == []
    monkeypatch.setenv(qk.ENV_VAR, "auto")
    call(qk.quantized_linear, x, layer, 16, 4, 4)
    assert calls == [1]


def test_import_without_triton() -> None:
    """`import qvgen_kernels` works where triton is missing, and the CPU path still runs."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, qvgen_kernels as qk\n"
        "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "assert qk.available_backends() == ['torch', 'cpu'], qk.available_backends()\n"
        "q = qk.pack_weight(torch.randint(0, 16, (4, 8), dtype=torch.uint8), 4)\n"
        "qs = torch.zeros(4, dtype=torch.int32)\n"
        "y = qk.quantized_linear(torch.randn(2, 8), q, torch.ones(4), torch.zeros(4), qs, in_features=8, w_bits=4,"
        " a_bits=4)\n"
        "assert y.shape == (2, 4)\n"
        "try:\n    qk.resolve_backend('triton', 'cpu')\nexcept RuntimeError as e:\n    assert 'pip install' in str(e)\n"
        "else:\n    raise AssertionError('triton backend resolved without triton')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", qk.ENV_VAR)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------------------------------
# the reference is the training quantizer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reference_codes_equal_training_fake_quant(bits: int) -> None:
    from qvgen.quantizers import fake_quant_act

    x = torch.randn(2, 9, 40) * 3
    lo = torch.rand(2, 1, 1) * 0.3 + 0.6  # per-sample buckets, as select_clip returns them
    hi = torch.tensor(0.9025)
    q, s, z, qsum = reference.quantize_activation(x, lo, hi, bits)
    assert q.dtype == torch.uint8 and s.shape == z.shape == qsum.shape == (2, 9, 1)
    assert int(q.max()) <= 2**bits - 1
    assert torch.equal(s * (q.float() - z), fake_quant_act(x, lo, hi, bits))
    assert torch.equal(qsum, q.to(torch.int32).sum(-1, keepdim=True))


def test_reference_linear_is_dequantized_matmul() -> None:
    """The reference equals x̂ Ŵᵀ + b computed from the training-side fake quantizers."""
    from qvgen.quantizers import fake_quant_act

    layer = make_layer(6, 20, 4, rank=3)
    x = torch.randn(5, 20, dtype=torch.float64)
    y = call(reference.quantized_linear, x, layer, 20, 4, 4, clip_lo=0.9, clip_hi=0.8)
    x_hat = fake_quant_act(x.float(), 0.9, 0.8, 4).double()
    w_hat = layer["w_scale"].double()[:, None] * (layer["q"].double() - layer["w_zero"].double()[:, None])
    pd, pu = layer["phi_down"].double(), layer["phi_up"].double()
    expect = x_hat @ w_hat.T + layer["bias"].double() + (x_hat @ pd.T) @ pu.T
    torch.testing.assert_close(y, expect, rtol=1e-6, atol=1e-7)  # training rounds x̂ to fp32 (≈6e-8)


# ---------------------------------------------------------------------------------------------
# the CPU path against the reference
# ---------------------------------------------------------------------------------------------
def _clip_variants(x: torch.Tensor):
    b, l = x.shape[0], x.shape[1]
    return [
        (1.0, 1.0),
        (0.9025, torch.tensor(0.9)),  # number and 0-d tensor
        (torch.rand(b, 1) * 0.3 + 0.6, torch.rand(b, 1) * 0.3 + 0.6),  # per sample, (B, 1)
        (torch.rand(b, l) * 0.3 + 0.6, torch.rand(b, l, 1) * 0.3 + 0.6),  # per token, both spellings
    ]


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_cpu_quantize_activation_exact(bits: int) -> None:
    x = torch.randn(3, 11, 37) * 2
    x[0, 0] = 0.0  # zero row: scale floor
    x[0, 1] = 4.25  # constant row
    x[1, 2, :5] = 1e4  # outliers
    for lo, hi in _clip_variants(x):
        got = cpu.quantize_activation(x, lo, hi, bits)
        ref = reference.quantize_activation(x, lo, hi, bits)
        for g, r in zip(got, ref, strict=True):
            assert g.dtype == r.dtype and g.shape == r.shape
            assert torch.equal(g, r)
        pub = qk.quantize_activation(x, lo, hi, bits, backend="cpu")
        assert torch.equal(pub[0], ref[0])


@pytest.mark.parametrize(
    ("w_bits", "a_bits"), [(4, 4), (4, 8), (8, 8), (3, 3), (2, 2), (4, 6), (6, 4), (8, 4), (5, 7), (4, None), (8, None)]
)
@pytest.mark.parametrize("rank", [0, 5])
def test_cpu_linear_matches_reference(w_bits: int, a_bits: int | None, rank: int) -> None:
    n, k = 19, 45  # N not a multiple of 8, odd K
    layer = make_layer(n, k, w_bits, rank=rank, seed=w_bits * 10 + (a_bits or 0))
    x = torch.randn(2, 7, k) * 2
    for lo, hi in _clip_variants(x)[1:3]:
        y = call(cpu.quantized_linear, x, layer, k, w_bits, a_bits, clip_lo=lo, clip_hi=hi)
        y_ref = call(
            reference.quantized_linear, x, layer, k, w_bits, a_bits, clip_lo=lo, clip_hi=hi, out_dtype=torch.float64
        )
        assert y.shape == (2, 7, n)
        assert_matches(y, y_ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 64])
def test_cpu_linear_dtypes(dtype: torch.dtype, m: int) -> None:
    n, k = 24, 64
    layer = make_layer(n, k, 4, rank=4)
    x = (torch.randn(m, k) * 3).to(dtype)
    y = call(qk.quantized_linear, x, layer, k, 4, 4, clip_lo=0.9, clip_hi=0.9, backend="cpu")
    y_ref = call(reference.quantized_linear, x, layer, k, 4, 4, clip_lo=0.9, clip_hi=0.9, out_dtype=torch.float64)
    assert_matches(y, y_ref, dtype)
    y32 = call(qk.quantized_linear, x, layer, k, 4, 4, clip_lo=0.9, clip_hi=0.9, out_dtype=torch.float32, backend="cpu")
    assert_matches(y32, y_ref, torch.float32)


def test_cpu_integer_part_exact() -> None:
    """With unit scales, zero z_w and no bias, y is the integer sum itself: exact in fp32."""
    n, k = 16, 96
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    x = torch.randint(-7, 9, (4, k)).float()
    x[:, 0], x[:, 1] = -7.0, 8.0  # min -7, max 8 → s = 1, z = 7
    y = cpu.quantized_linear(
        x, qk.pack_weight(q, 4), torch.ones(n), torch.zeros(n), q.int().sum(1).int(), in_features=k, w_bits=4, a_bits=4
    )
    assert torch.equal(y.long(), reference.integer_dot(x.long() + 7, torch.full((4, 1), 7), q))


def test_constant_and_huge_tokens_stay_finite() -> None:
    n, k = 8, 32
    layer = make_layer(n, k, 4)
    x = torch.randn(6, k)
    x[0] = 0.0
    x[1] = -3.5
    x[2] = 1e20 * torch.randn(k)  # huge activations
    x[3] = 100.0 + 1e-6 * torch.randn(k)  # spread far below the scale floor: |x/s| > 2^22
    x[4, 0] = 1e6  # one outlier, tiny clip factor below
    for backend in ("cpu", "torch"):
        y = call(qk.quantized_linear, x, layer, k, 4, 4, clip_lo=0.9, clip_hi=0.9, backend=backend)
        assert torch.isfinite(y).all()
    y = call(cpu.quantized_linear, x, layer, k, 4, 4, clip_lo=0.9, clip_hi=torch.tensor([0.9] * 4 + [1e-3, 0.9]))
    y_ref = call(
        reference.quantized_linear,
        x,
        layer,
        k,
        4,
        4,
        clip_lo=0.9,
        clip_hi=torch.tensor([0.9] * 4 + [1e-3, 0.9]),
        out_dtype=torch.float64,
    )
    assert_matches(y, y_ref, torch.float32)


def test_argument_errors() -> None:
    layer = make_layer(8, 16, 4)
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="in_features=16"):
        call(qk.quantized_linear, torch.randn(2, 17), layer, 16, 4, 4)
    with pytest.raises(ValueError, match=r"qweight must be uint8 of shape \(N, 9\)"):
        call(qk.quantized_linear, torch.randn(2, 17), layer, 17, 4, 4)
    with pytest.raises(ValueError, match="do not broadcast"):
        call(qk.quantized_linear, x, layer, 16, 4, 4, clip_lo=torch.ones(3))
    with pytest.raises(ValueError, match="2..8"):
        call(qk.quantized_linear, x, layer, 16, 4, 9)
    with pytest.raises(ValueError, match="phi_down"):
        qk.quantized_linear(
            x, layer["qweight"], layer["w_scale"], layer["w_zero"], layer["w_qsum"],
            in_features=16, w_bits=4, a_bits=4, phi_down=torch.zeros(2, 16),
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# input transform (rotation / smoothing) before activation quantization
# ---------------------------------------------------------------------------------------------
def transform_args(k: int, kind: str, block: int, seed: int = 0) -> dict:
    """kwargs of the transform: kind "rot", "smooth" or "both"; int8 signs for "rot", float for "both"."""
    g = torch.Generator().manual_seed(seed)
    out: dict = {"input_signs": None, "rot_block": 0, "smooth": None}
    if kind in ("rot", "both"):
        signs = torch.randint(0, 2, (k,), generator=g) * 2 - 1
        out.update(input_signs=signs.to(torch.int8 if kind == "rot" else torch.float32), rot_block=block)
    if kind in ("smooth", "both"):
        out["smooth"] = torch.rand(k, generator=g) * 3 + 0.1
    return out


TRANSFORM_CASES = [("rot", 2, 64), ("rot", 32, 96), ("smooth", 0, 77), ("both", 128, 384), ("both", 256, 512)]


@pytest.mark.parametrize(("kind", "block", "k"), TRANSFORM_CASES)
def test_reference_transform_equals_training_rotation(kind: str, block: int, k: int) -> None:
    """The kernels' fp32 transform is bit for bit the training path's `rotate(x) / smooth`."""
    from qvgen.transforms import rotate

    tf = transform_args(k, kind, block)
    x = torch.randn(9, k) * 3
    want = rotate(x, tf["input_signs"].float(), block) if tf["input_signs"] is not None else x
    want = want / tf["smooth"] if tf["smooth"] is not None else want
    got = reference.apply_transform(x, *reference.check_transform(k, **tf, device=x.device))
    assert torch.equal(got, want)


@pytest.mark.parametrize(("kind", "block", "k"), TRANSFORM_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_transform_quantize_exact(kind: str, block: int, k: int, dtype: torch.dtype) -> None:
    tf = transform_args(k, kind, block)
    x = (torch.randn(300, k) * 2).to(dtype)  # 300 rows: several cache chunks for K ≥ 256
    x[3, :2] = 3e4
    got = cpu.quantize_activation(x, 0.9, 0.8, 4, **tf)
    ref = reference.quantize_activation(x, 0.9, 0.8, 4, **tf)
    assert all(torch.equal(g, r) for g, r in zip(got, ref, strict=True))
    plain = reference.quantize_activation(x, 0.9, 0.8, 4)
    assert not torch.equal(got[0], plain[0])  # the transform changed the codes


@pytest.mark.parametrize(("w_bits", "a_bits", "rank"), [(4, 4, 0), (4, 4, 3), (8, 8, 0), (4, None, 2)])
def test_cpu_linear_with_transform_matches_reference(w_bits: int, a_bits: int | None, rank: int) -> None:
    k, n = 96, 40
    layer = make_layer(n, k, w_bits, rank=rank)
    tf = transform_args(k, "both", 32)
    x = torch.randn(2, 17, k)
    y = call(cpu.quantized_linear, x, layer, k, w_bits, a_bits, clip_lo=0.9, clip_hi=0.95, **tf)
    y_ref = call(reference.quantized_linear, x, layer, k, w_bits, a_bits, clip_lo=0.9, clip_hi=0.95, **tf)
    assert_matches(y, y_ref.double(), torch.float32)
    y_pub = call(qk.quantized_linear, x, layer, k, w_bits, a_bits, clip_lo=0.9, clip_hi=0.95, backend="cpu", **tf)
    assert torch.equal(y_pub, y)


def test_transform_argument_errors() -> None:
    x, s = torch.randn(2, 96), torch.ones(96)
    with pytest.raises(ValueError, match="power of two"):
        qk.quantize_activation(x, 1.0, 1.0, 4, input_signs=s, rot_block=24)
    with pytest.raises(ValueError, match="does not divide"):
        qk.quantize_activation(x, 1.0, 1.0, 4, input_signs=s, rot_block=64)
    with pytest.raises(ValueError, match="needs input_signs"):
        qk.quantize_activation(x, 1.0, 1.0, 4, rot_block=32)
    with pytest.raises(ValueError, match="needs rot_block"):
        qk.quantize_activation(x, 1.0, 1.0, 4, input_signs=s)
    with pytest.raises(ValueError, match="smooth must have"):
        qk.quantize_activation(x, 1.0, 1.0, 4, smooth=torch.ones(95), backend="torch")


# ---------------------------------------------------------------------------------------------
# the custom op for torch.compile (kernels/torch_op.py)
# ---------------------------------------------------------------------------------------------
def _op_args(layer: dict, x: torch.Tensor, k: int, a_bits: int, act_group: int = 0) -> tuple:
    lo, hi = torch.full((x.shape[0], 1), 0.9), torch.full((x.shape[0], 1), 0.95)
    t = (x, layer["qweight"], layer["w_scale"], layer["w_zero"], layer["w_qsum"], layer["bias"], lo, hi)
    return t + (None, None, None, None, k, 4, a_bits, 0, torch.float32, "cpu", act_group)


def test_custom_op_schema_fake_and_compile() -> None:
    """The op's schema and fake implementation pass torch's own checks, and a fullgraph
    torch.compile of it gives the eager layer's output bit for bit (same backend, same kernels)."""
    from qvgen_kernels import torch_op

    k, n = 64, 24
    layer = make_layer(n, k, 4)
    x = torch.randn(5, k)
    outs = {}
    for a_bits, group in ((4, 0), (0, 0), (4, 32)):  # W4A4, weight-only, W4A4 with groups of 32 inputs
        args = _op_args(layer, x, k, a_bits, group)
        torch.library.opcheck(
            torch.ops.qvgen.quantized_linear.default, args, test_utils=("test_schema", "test_faketensor")
        )
        eager = call(
            qk.quantized_linear, x, layer, k, 4, a_bits or None, clip_lo=args[6], clip_hi=args[7], backend="cpu",
            act_group=group,
        )  # fmt: skip
        compiled = torch.compile(torch_op.quantized_linear_op, fullgraph=True, backend="eager")
        outs[(a_bits, group)] = compiled(*args)
        assert torch.equal(outs[(a_bits, group)], eager)
    assert not torch.allclose(outs[(4, 32)], outs[(4, 0)])  # the group size reached the kernel
