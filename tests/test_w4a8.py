"""Grouped W4A8 (`qvgen.schemes.w4a8`) against comfy-kitchen 0.2.40's `AsymW4A8Int8Layout` (eager backend).

Weights are drawn as multiples of 1/64 with |w| ≤ 1, so the ConvRot rotation (entries ±1/16, 256
terms) is exact in float32 whatever order a matmul sums in: the rotated weight, and therefore every
code, scale and grid value below, is bit-identical between the two implementations on any CPU.
The per-group least-squares scale sums 16 products with `.sum(-1)` on both sides (same op, same
shape). Layer outputs go through a float GEMM on our side and an exact int32 GEMM on comfy-kitchen's:
max |Δ| ≤ 1e-5 · max |y| (float32, K = 512).
"""

from __future__ import annotations

import pytest
import torch

from qvgen.schemes import w4a8
from qvgen.schemes.convrot import rotate

ck = pytest.importorskip("comfy_kitchen")
ew = pytest.importorskip("comfy_kitchen.backends.eager.w4a8_int8")
from comfy_kitchen.tensor import AsymW4A8Int8Layout, QuantizedTensor  # noqa: E402
from comfy_kitchen.tensor.w4a8_packed import default_w4a8_codebook  # noqa: E402


def _weight(n=64, k=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-32, 33, (n, k), generator=g).float() / 64
    w[0, :16] = 0  # a zero group in the original basis
    w[5, 17] = 1.0  # an outlier
    w[7] = 0  # an all-zero row: the 1e-8 floors
    return w


def _kitchen(w):
    return ew.quantize_w4a8_int8_weight(w, codebook_tensor=default_w4a8_codebook())


def test_codebook_is_the_layouts():
    assert torch.equal(w4a8.codebook(), default_w4a8_codebook())


def test_init_and_codes_bit_identical_to_kitchen_quantizer():
    w = _weight()
    q, s_rel, s_ch, corr, cb = _kitchen(w)
    assert corr is None and torch.equal(cb, w4a8.codebook())
    wr = rotate(w)
    s_rel2, s_ch2 = w4a8.init_scales(wr)
    assert torch.equal(s_rel2.view(torch.uint8), s_rel.view(torch.uint8))
    assert torch.equal(s_ch2, s_ch)
    assert torch.equal(w4a8.pack_codes(w4a8.assign_codes(wr, s_rel2, s_ch2)), q)
    quant = w4a8.GroupedCodebookQuantizer(*w.shape)
    quant.init_from(wr)
    t = quant.export(wr)
    assert torch.equal(t["weight"], q) and torch.equal(t["weight_s_rel"].view(torch.uint8), s_rel.view(torch.uint8))


def test_fake_weight_is_the_layouts_dequantized_weight():
    w = _weight(seed=1)
    wr = rotate(w)
    quant = w4a8.GroupedCodebookQuantizer(*w.shape)
    quant.init_from(wr)
    with torch.no_grad():  # learned scales: what the layout decodes is whatever is exported
        quant.channel_gain.copy_(torch.linspace(-0.1, 0.1, w.shape[0]))
        quant.rel_gain.fill_(0.1)
    t = quant.export(wr)
    params = AsymW4A8Int8Layout.Params(
        scale=t["weight_s_rel"],
        s_channel=t["weight_s_channel"],
        codebook=t["weight_codebook"],
        orig_dtype=torch.float32,
        orig_shape=tuple(w.shape),
    )
    ref = AsymW4A8Int8Layout.dequantize(t["weight"], params)
    with torch.no_grad():
        ours = quant(wr)
    # our weight lives in the rotated space; rotate it back with comfy-kitchen's own rotation
    back = ew.rotate_int8_convrot_weight(ours, 256)
    assert torch.equal(back, ref)
    assert torch.equal(
        ours, w4a8.int8_weight(t["weight"], t["weight_s_rel"], t["weight_codebook"]) * t["weight_s_channel"][:, None]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_codes_bit_identical(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 512, generator=g)
    x[:, 3] *= 50
    x[4] = 0  # zero token: the tiny-scale guard
    xr = rotate(x.to(dtype))
    from comfy_kitchen.backends.eager.quantization import quantize_int8_rowwise

    q_ref, s_ref = quantize_int8_rowwise(xr)  # what the layout's int8_linear runs on each token
    q, s = w4a8.quantize_acts(xr)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert torch.equal(w4a8.fake_quant_acts(xr), q.float() * s)


@pytest.mark.parametrize("k", [512, 128])  # K = 128: the layout's convrot_groupsize 64
def test_layer_matches_the_layouts_linear(k):
    w = _weight(k=k, seed=3)
    rg = w4a8.rotation_group(k)
    wr = rotate(w, rg)
    quant = w4a8.GroupedCodebookQuantizer(*w.shape)
    quant.init_from(wr)
    t = quant.export(wr)
    bias = torch.randn(w.shape[0])
    x = torch.randn(2, 5, k)
    qt = QuantizedTensor(
        t["weight"],
        "AsymW4A8Int8Layout",
        AsymW4A8Int8Layout.Params(
            scale=t["weight_s_rel"],
            s_channel=t["weight_s_channel"],
            codebook=t["weight_codebook"],
            orig_dtype=torch.float32,
            orig_shape=tuple(w.shape),
            convrot_groupsize=rg,
        ),
    )
    with ck.registry.use_backend("eager"):
        ref = torch.nn.functional.linear(x, qt, bias)
    ours = w4a8.w4a8_linear(
        x, t["weight"], t["weight_s_rel"], t["weight_s_channel"], t["weight_codebook"], bias, convrot_group=rg
    )
    layer = w4a8.W4A8Linear(k, w.shape[0], True, torch.float32)
    layer.load_state_dict(t | {"bias": bias})
    with torch.no_grad():
        fake = w4a8.fake_quant_acts(rotate(x, rg)) @ quant(wr).t() + bias
        assert torch.equal(layer(x), ours)
        assert torch.allclose(
            layer.dequantize_weight(), AsymW4A8Int8Layout.dequantize(t["weight"], qt._params), atol=1e-6
        )
    for y in (ours, fake):
        err = float((y - ref).abs().max())
        assert err <= 1e-5 * float(ref.abs().max()), err


def test_gradients_straight_through_and_to_both_scales():
    torch.manual_seed(4)
    w = _weight(n=8, k=256, seed=4)
    wr = rotate(w).requires_grad_(True)
    quant = w4a8.GroupedCodebookQuantizer(8, 256)
    quant.init_from(wr)
    g_out = torch.randn(8, 256)
    (quant(wr) * g_out).sum().backward()
    s_rel, s_ch = (s.detach() for s in quant.effective_scales())
    levels = w4a8.grid_levels(s_rel, w4a8.codebook())
    t = wr.detach().view(8, 16, 16) / s_ch.view(-1, 1, 1)
    idx = w4a8.nearest_index(t, levels)
    # weight: straight through (s·(g/s), so up to one rounding)
    assert torch.allclose(wr.grad, g_out, rtol=1e-6, atol=0)
    # s_channel = s0 (1 + g): Σ grad · (level - w/s) · s0, LSQ-scaled
    lv = levels.gather(-1, idx)
    terms = g_out.view(8, 16, 16) * (lv - t) * quant.s_channel0.view(-1, 1, 1)
    expect_ch = terms.sum((1, 2)) * quant.channel_grad
    # a float32 sum of n terms is within n · 6e-8 · Σ|terms| of the exact one, whatever the order
    bound = 2 * 256 * 6e-8 * terms.abs().sum((1, 2)) * quant.channel_grad
    assert ((quant.channel_gain.grad - expect_ch).abs() <= bound + 1e-12).all()
    # s_rel = s_rel0 (1 + g): Σ grad · s_channel · codebook[idx] · s_rel0 where the level is not clamped at ±127
    raw = w4a8.codebook()[idx] * s_rel.unsqueeze(-1)
    live = raw.round().abs() <= 127
    terms = g_out.view(8, 16, 16) * s_ch.view(-1, 1, 1) * w4a8.codebook()[idx] * live * quant.s_rel0.unsqueeze(-1)
    expect_rel = terms.sum(-1) * quant.rel_grad
    bound = 3 * 16 * 6e-8 * terms.abs().sum(-1) * quant.rel_grad  # three roundings per term, 16 terms
    assert ((quant.rel_gain.grad - expect_rel).abs() <= bound + 1e-12).all()
    assert quant.rel_gain.grad.abs().sum() > 0


def test_rotation_group_per_k_and_rejects_the_rest():
    assert [w4a8.rotation_group(k) for k in (512, 768, 128, 320, 48, 40)] == [256, 256, 64, 64, 16, 0]
    with pytest.raises(ValueError, match="divisible by 16"):
        w4a8.GroupedCodebookQuantizer(4, 40)
