"""Per-group activation quantization (`QVGenConfig.act_group_size`): training quantizer, kernels, packed model.

Checks, each against an independent computation:
- the reference's codes/scales are the training fake quantizer's (same fp32 operations: bit for bit),
  and a group of K features is per-token quantization exactly;
- the CPU path's codes, scales, zero points and sums equal the reference's bit for bit; its layer
  output matches the float64 reference within the fp32 rounding of summing K/g group products
  (bound stated at `_fp32_bound`);
- a packed model (export → load, integer path) follows the fake-quant model within
  `tiny_models.assert_matches_fake_quant`'s tolerance, which the per-token model misses by far.
"""

from __future__ import annotations

import pytest
import qvgen_kernels as qk
import torch
from qvgen_kernels import cpu, reference
from tiny_models import assert_matches_fake_quant, tiny_wan, wan_inputs

from qvgen import PackedLinear, QVGenConfig, convert_model, load_quantized_model, save_quantized
from qvgen.config import ConfigError
from qvgen.quantizers import ActQuantizer, act_group_length, fake_quant_act

U32 = 2.0**-24  # fp32 unit roundoff


def _x(shape=(2, 5, 64), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    rows = x.view(-1, shape[-1])
    rows[0, :16] += 30.0  # one outlier group: what groups are for
    rows[3] = 0.0  # zero token: scale floor
    return x


def _clips(x: torch.Tensor):
    b, l = x.shape[0], x.shape[1]
    g = torch.Generator().manual_seed(5)
    return [
        (1.0, 1.0),
        (0.9025, torch.tensor(0.9)),
        (torch.rand(b, 1, 1, generator=g) * 0.3 + 0.6, torch.rand(b, 1, 1, generator=g) * 0.3 + 0.6),
        (torch.rand(b, l, generator=g) * 0.3 + 0.6, torch.rand(b, l, 1, generator=g) * 0.3 + 0.6),
    ]


def _dequant(q, s, z, group):
    return (s.unsqueeze(-1) * (q.float().unflatten(-1, (-1, group)) - z.unsqueeze(-1))).flatten(-2)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [8, 16])
def test_reference_codes_are_the_training_quantizer(bits: int, group: int) -> None:
    x = _x()
    for lo, hi in _clips(x)[:3] + [(_clips(x)[3][1], _clips(x)[3][1])]:  # the training side's (…, 1) spellings
        q, s, z, qsum = reference.quantize_activation(x, lo, hi, bits, act_group=group)
        assert s.shape == z.shape == qsum.shape == (2, 5, 64 // group)
        assert torch.equal(_dequant(q, s, z, group), fake_quant_act(x, lo, hi, bits, group=group))
        assert torch.equal(qsum, q.to(torch.int32).unflatten(-1, (-1, group)).sum(-1))


def test_one_group_of_k_is_per_token() -> None:
    x = _x()
    lo, hi = _clips(x)[2]
    grouped = reference.quantize_activation(x, lo, hi, 4, act_group=64)
    per_token = reference.quantize_activation(x, lo, hi, 4)
    assert all(torch.equal(a, b) for a, b in zip(grouped, per_token, strict=True))
    # and groups do change the outlier token's codes (the test above is not vacuous)
    assert not torch.equal(reference.quantize_activation(x, lo, hi, 4, act_group=16)[0], per_token[0])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("transform", [False, True])
def test_cpu_quantize_activation_exact(bits: int, transform: bool) -> None:
    x = _x((3, 4, 64))
    tf = {}
    if transform:
        g = torch.Generator().manual_seed(2)
        signs = torch.randint(0, 2, (64,), generator=g).to(torch.int8) * 2 - 1
        tf = dict(input_signs=signs, rot_block=32, smooth=torch.rand(64, generator=g) + 0.5)
    for lo, hi in _clips(x):
        ref = reference.quantize_activation(x, lo, hi, bits, act_group=16, **tf)
        got = cpu.quantize_activation(x, lo, hi, bits, act_group=16, **tf)
        for a, b in zip(got, ref, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _layer(n: int, k: int, w_bits: int, rank: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    qmax = 2**w_bits - 1
    q = torch.randint(0, qmax + 1, (n, k), generator=g, dtype=torch.uint8)
    return dict(
        q=q,
        qweight=qk.pack_weight(q, w_bits),
        w_scale=torch.rand(n, generator=g) * 0.02 + 1e-3,
        w_zero=torch.rand(n, generator=g) * qmax,
        w_qsum=q.to(torch.int32).sum(dim=1),
        bias=torch.randn(n, generator=g),
        phi_down=(torch.randn(rank, k, generator=g) * 0.05) if rank else None,
        phi_up=(torch.randn(n, rank, generator=g) * 0.05) if rank else None,
    )


def _linear(fn, x, layer, k, w_bits, a_bits, **kw):
    keys = ("qweight", "w_scale", "w_zero", "w_qsum", "bias")
    return fn(
        x, *(layer[key] for key in keys), in_features=k, w_bits=w_bits, a_bits=a_bits,
        phi_down=layer["phi_down"], phi_up=layer["phi_up"], **kw,
    )  # fmt: skip


def _fp32_bound(x_hat: torch.Tensor, layer: dict, w_bits: int, n_groups: int) -> torch.Tensor:
    """How far fp32 evaluation may drift from the float64 reference, per output element.

    The CPU path's integer products are exact; what rounds is fp32: per group the product
    `s_j · A_j`, the running sum over K/g groups, the zero-point and scale multiplications, bias and
    Φ — at most K/g + 8 roundings, each ≤ 2^-24 of a partial sum bounded by
    `B = Σ_k |x̂_k| s_w (|q_w - c_w| + |c_w - z_w|) + |b| + |x̂| |R|ᵀ |L|ᵀ`. The bound is 2× that.
    """
    c_w = 128 if w_bits == 8 else 0
    q = layer["q"].double()
    mag = layer["w_scale"].double()[:, None] * ((q - c_w).abs() + (c_w - layer["w_zero"].double()).abs()[:, None])
    x_abs = x_hat.abs().reshape(-1, x_hat.shape[-1])
    b = x_abs @ mag.T + layer["bias"].double().abs()
    if layer["phi_down"] is not None:
        b = b + (x_abs @ layer["phi_down"].double().abs().T) @ layer["phi_up"].double().abs().T
    return 2 * (n_groups + 8) * U32 * b


@pytest.mark.parametrize(("w_bits", "a_bits"), [(4, 4), (4, 8), (8, 8), (3, 3), (8, 4)])
@pytest.mark.parametrize("rank", [0, 5])
def test_cpu_linear_matches_reference(w_bits: int, a_bits: int, rank: int) -> None:
    n, k, group = 19, 96, 16
    layer = _layer(n, k, w_bits, rank, seed=w_bits * 10 + a_bits + rank)
    x = _x((2, 7, k), seed=rank)
    for lo, hi in _clips(x)[1:]:
        y = _linear(cpu.quantized_linear, x, layer, k, w_bits, a_bits, clip_lo=lo, clip_hi=hi, act_group=group)
        y_ref = _linear(
            reference.quantized_linear, x, layer, k, w_bits, a_bits,
            clip_lo=lo, clip_hi=hi, act_group=group, out_dtype=torch.float64,
        )  # fmt: skip
        assert y.shape == (2, 7, n) and y.dtype == torch.float32
        x_hat = _dequant(*reference.quantize_activation(x, lo, hi, a_bits, act_group=group)[:3], group).double()
        err = (y.double() - y_ref).reshape(-1, n).abs()
        assert (err <= _fp32_bound(x_hat, layer, w_bits, k // group)).all(), f"max |Δ| {err.max():.3g}"


@pytest.mark.parametrize("a_bits", [4, 8])
def test_cpu_linear_tiles_cover_the_output(monkeypatch: pytest.MonkeyPatch, a_bits: int) -> None:
    """Tiles smaller than the output (and not dividing it) give the same result as one tile."""
    n, k, group = 19, 64, 16
    layer = _layer(n, k, 4, 3, seed=a_bits)
    x = _x((2, 7, k), seed=1)
    lo, hi = _clips(x)[3]
    whole = _linear(cpu.quantized_linear, x, layer, k, 4, a_bits, clip_lo=lo, clip_hi=hi, act_group=group)
    monkeypatch.setattr(cpu, "TILE_M", 5)
    monkeypatch.setattr(cpu, "TILE_N", 7)
    tiled = _linear(cpu.quantized_linear, x, layer, k, 4, a_bits, clip_lo=lo, clip_hi=hi, act_group=group)
    assert torch.equal(tiled, whole)  # same fp32 operations per element, in the same order


def test_reference_linear_is_dequantized_matmul() -> None:
    """The grouped reference equals x̂ Ŵᵀ + b + (x̂ Rᵀ) Lᵀ with x̂ from the training fake quantizer."""
    k, group = 48, 16
    layer = _layer(6, k, 4, rank=3, seed=1)
    x = _x((5, k)).double()
    y = _linear(reference.quantized_linear, x, layer, k, 4, 4, clip_lo=0.9, clip_hi=0.8, act_group=group)
    x_hat = fake_quant_act(x.float(), 0.9, 0.8, 4, group=group).double()
    w_hat = layer["w_scale"].double()[:, None] * (layer["q"].double() - layer["w_zero"].double()[:, None])
    pd, pu = layer["phi_down"].double(), layer["phi_up"].double()
    expect = x_hat @ w_hat.T + layer["bias"].double() + (x_hat @ pd.T) @ pu.T
    torch.testing.assert_close(y, expect, rtol=1e-6, atol=1e-7)  # training rounds x̂ to fp32 (≈6e-8)


def test_argument_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(3, 40)
    with pytest.raises(ValueError, match="act_group=16 does not divide the 40"):
        cpu.quantize_activation(x, 1.0, 1.0, 4, act_group=16)
    with pytest.raises(ValueError, match="act_group must be a non-negative int"):
        reference.quantize_activation(x, 1.0, 1.0, 4, act_group=-8)
    # the triton backend refuses groups by name, before any kernel is compiled
    monkeypatch.setattr(qk.backend, "triton_importable", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(NotImplementedError, match="act_group=8 .*backend='cpu'"):
        qk.quantize_activation(x, 1.0, 1.0, 4, act_group=8, backend="triton")
    layer = _layer(4, 40, 4, 0, seed=0)
    with pytest.raises(NotImplementedError, match="act_group_size"):
        _linear(qk.quantized_linear, x, layer, 40, 4, 4, act_group=8, backend="triton")


def test_config_field_and_layer_fallback() -> None:
    cfg = QVGenConfig(act_group_size=64)
    assert QVGenConfig.from_json(cfg.to_json()).act_group_size == 64
    assert QVGenConfig.from_dict({}).act_group_size is None  # files without the field: per token
    with pytest.raises(ConfigError, match="act_group_size"):
        QVGenConfig(act_group_size=0)
    for scheme in ("convrot_w4a4", "nvfp4", "w4a8_int8", "svdquant_w4a4"):  # their formats fix the act scaling
        with pytest.raises(ConfigError, match=f"act_group_size: scheme '{scheme}'"):
            QVGenConfig(scheme=scheme, act_group_size=64)
    assert act_group_length(1536, 128) == 128
    assert act_group_length(128, 128) == 0  # one group is the whole token
    assert act_group_length(96, 64) == 0  # not a multiple: per token
    assert act_group_length(1536, None) == 0


def test_train_and_demo_flags_reach_the_config() -> None:
    from qvgen.demo.run import _configs
    from qvgen.demo.run import build_parser as demo_parser
    from qvgen.train.cli import build_parser, quant_config

    assert quant_config(build_parser().parse_args(["--model", "m", "--act-group-size", "128"])).act_group_size == 128
    assert quant_config(build_parser().parse_args(["--model", "m"])).act_group_size is None
    configs = _configs(demo_parser().parse_args(["--act-group-size", "64", "--transforms", "none"]))
    assert {c.act_group_size for c in configs.values()} == {64}


def test_clip_logits_train_through_groups() -> None:
    aq = ActQuantizer(4, n_buckets=3, group=16)
    x = _x()
    aq(x, bucket=torch.tensor([0, 2])).pow(2).sum().backward()
    grad = aq.clip_logits.grad
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0 and grad[1].abs().sum() == 0


def _tiny_grouped(act_group_size: int | None):
    model = tiny_wan()
    cfg = QVGenConfig(rank=4, n_buckets=4, act_group_size=act_group_size)
    convert_model(model, cfg, progress=False)
    g = torch.Generator().manual_seed(3)
    for m in model.modules():  # non-trivial clip factors, as after training
        if getattr(m, "act_quantizer", None) is not None:
            m.act_quantizer.clip_logits.data = torch.rand(m.act_quantizer.clip_logits.shape, generator=g) * 4
    return model, cfg


def test_packed_model_follows_fake_quant(tmp_path) -> None:
    model, cfg = _tiny_grouped(32)  # tiny_wan: K = 64 → 2 groups, K = 128 → 4; K = 32 stays per token
    assert model.blocks[0].ffn.net[2].act_quantizer.group == 32
    x, t, e = wan_inputs()
    with torch.no_grad():
        ref = model(x, t, e, return_dict=False)[0]
    save_quantized(model, cfg, tmp_path / "ckpt", dtype=torch.float32)
    loaded = load_quantized_model(tmp_path / "ckpt")
    layer = loaded.blocks[0].ffn.net[2]
    assert isinstance(layer, PackedLinear) and layer.act_group == 32
    with torch.no_grad():
        out = loaded(x, t, e, return_dict=False)[0]
    assert_matches_fake_quant(out, ref)
    # the same trained tensors quantized per token are far outside that tolerance
    per_token, _ = _tiny_grouped(None)
    with torch.no_grad():
        other = per_token(x, t, e, return_dict=False)[0]
    assert float((other - ref).norm() / ref.norm()) > 2e-2


def test_model_card_states_the_activation_groups() -> None:
    from qvgen.model_card import CardInfo, render_model_card

    def card(group: int | None) -> str:
        info = CardInfo("me/m", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", QVGenConfig(act_group_size=group))
        return str(render_model_card(info))

    assert "4-bit, per group of 128 input features of a token" in card(128)
    assert "4-bit, per token" in card(None)
