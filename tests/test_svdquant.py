"""SVDQuant W4A4 (`qvgen.schemes.svdquant`) against comfy-kitchen 0.2.40's eager reference.

Equality is asserted where both sides run the same element-wise float operations on the same
inputs (codes, scales, dequantized operands): those are bit-identical whatever the CPU. Where a
float GEMM is involved (the layer output) the two sides may sum in a different order:
max |Δ| ≤ 1e-5 · max |y| in float32 (K ≤ 512 terms of magnitude ≤ max |y|, each rounding ≤ 6e-8).
The inputs include adversarial ones: an outlier channel, an all-zero group (the 1e-10 floor),
values landing exactly on half-steps (both sides round half to even on the same floats).
"""

from __future__ import annotations

import pytest
import torch

from qvgen.schemes import svdquant as sq

ck = pytest.importorskip("comfy_kitchen")
eager = pytest.importorskip("comfy_kitchen.backends.eager.svdquant")


def _inputs(m=9, k=256, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 5] *= 40  # an outlier channel
    x[1, 64:128] = 0  # an all-zero group: the 1e-10 floor
    x[2, :64] = torch.arange(64) * 0.5 - 16  # values on half-steps of the scale (absmax 16 → s = 16/7)
    smooth = torch.rand(k, generator=g) + 0.5
    return x.to(dtype), smooth.to(dtype)


def _unpacked_codes(q_packed, m):
    return sq.unpack_int4(q_packed[:m])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_codes_and_scales_bit_identical(dtype):
    x, smooth = _inputs(dtype=dtype)
    down = torch.randn(256, 8).to(dtype)
    q_ck, ascales, lora_act = eager.quantize_svdquant_w4a4(x, smooth, down)
    xs = x / smooth
    s = sq.group_absmax_scale(xs)
    assert torch.equal(sq.quantize_groups(xs, s), _unpacked_codes(q_ck, x.shape[0]))
    assert torch.equal(s.squeeze(-1).t(), ascales[:, : x.shape[0]])
    # the fake quantizer's output is exactly codes × scales
    fq = sq.GroupActQuantizer()(xs)
    ref = (_unpacked_codes(q_ck, x.shape[0]).to(dtype).unflatten(-1, (4, 64)) * s).flatten(-2)
    assert torch.equal(fq, ref)
    assert torch.equal(lora_act[: x.shape[0]], x.float() @ down.float())


def test_weight_export_runs_in_the_layouts_gemm_as_trained():
    torch.manual_seed(1)
    n, k, r = 48, 256, 8
    w = torch.randn(n, k)
    w[3, 70] = 30.0  # outlier
    wq = sq.GroupWeightQuantizer(n, k)
    wq.init_from(w)
    with torch.no_grad():
        wq.scale.mul_(torch.rand_like(wq.scale) * 0.4 + 0.8)  # learned scales
    qweight, wscales = wq.export(w)
    assert qweight.shape == (n, k // 2) and qweight.dtype == torch.int8
    assert wscales.shape == (k // 64, n) and wscales.dtype == torch.bfloat16
    # the fake-quantized weight is bit for bit the dequantized export (in float32 compute)
    assert torch.equal(wq(w), sq.dequantize_weight(qweight, wscales, torch.float32))

    x, smooth = _inputs(k=k)
    down, up, bias = torch.randn(k, r) * 0.1, torch.randn(n, r) * 0.1, torch.randn(n)
    q_x, ascales, lora_act = eager.quantize_svdquant_w4a4(x, smooth, down)
    ref = eager.scaled_mm_svdquant_w4a4(q_x, qweight, ascales, wscales.float(), lora_act, up, bias)[: x.shape[0]]
    ours = sq.svdquant_linear(x, qweight, wscales.float(), smooth, down, up, bias)
    fake = sq.GroupActQuantizer()(x / smooth) @ wq(w).t() + (x @ down) @ up.t() + bias
    for y in (ours, fake):
        err = float((y.detach() - ref).abs().max())
        assert err <= 1e-5 * float(ref.abs().max()), err


def test_layout_class_rebuilds_the_same_layer():
    """`from_state_dict`-style construction of the layout (what ComfyUI does) runs our tensors."""
    layout = pytest.importorskip("comfy_kitchen.tensor").TensorCoreSVDQuantW4A4Layout
    from comfy_kitchen.tensor import QuantizedTensor

    torch.manual_seed(2)
    n, k, r = 32, 128, 4
    w = torch.randn(n, k)
    wq = sq.GroupWeightQuantizer(n, k, scale_dtype=None)
    wq.init_from(w)
    qweight, wscales = wq.export(w, torch.float32)
    smooth, down, up = torch.rand(k) + 0.5, torch.randn(k, r) * 0.1, torch.randn(n, r) * 0.1
    params = layout.Params(
        scale=wscales, orig_dtype=torch.float32, orig_shape=(n, k), proj_down=down, proj_up=up, smooth_factor=smooth
    )
    qt = QuantizedTensor(qweight, "TensorCoreSVDQuantW4A4Layout", params)
    x = torch.randn(6, k)
    with ck.registry.use_backend("eager"):
        ref = torch.nn.functional.linear(x, qt)
    layer = sq.SVDQuantLinear(k, n, False, r, torch.float32)
    layer.load_state_dict(
        {
            "weight": qweight,
            "weight_scale": wscales,
            "weight_proj_down": down,
            "weight_proj_up": up,
            "weight_smooth_factor": smooth,
        }
    )
    with torch.no_grad():
        ours = layer(x)
        # the dequantized weight reproduces the layer on a token whose quantization is exact
        assert torch.allclose(layer.dequantize_weight(), qt.dequantize(), atol=1e-5)
    assert float((ours - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_straight_through_and_lsq_gradients():
    torch.manual_seed(3)
    n, k = 4, 128
    w = torch.randn(n, k, requires_grad=True)
    wq = sq.GroupWeightQuantizer(n, k, scale_dtype=None)
    wq.init_from(w)
    with torch.no_grad():
        wq.scale.mul_(0.7)  # some weights clip
    g_out = torch.randn(n, k)
    (wq(w) * g_out).sum().backward()
    s = wq.scale.detach()
    assert torch.equal(wq.effective_scale(), s)  # no export dtype: the parameter itself, bit for bit
    v = w.detach().unflatten(-1, (2, 64)) / s
    inside = (v.round().abs() <= 7).flatten(-2)
    assert 0 < int((~inside).sum()) < inside.numel() // 4
    # weight: identity inside the clamp range (up to (g·s)/s rounding), zero where clamped
    assert torch.allclose(w.grad, torch.where(inside, g_out, torch.zeros_like(g_out)), rtol=1e-6, atol=0)
    # scale: LSQ, Σ g · (clamp(round(v)) - v·[inside]) · grad_factor per group
    dq = torch.clamp(v.round(), -7, 7) - torch.where(v.round().abs() <= 7, v, torch.zeros_like(v))
    terms = g_out.unflatten(-1, (2, 64)) * dq
    expect = terms.sum(-1, keepdim=True) * wq.grad_factor
    # a float32 sum of n terms is within n · 6e-8 · Σ|terms| of the exact one, whatever the order
    bound = 2 * 64 * 6e-8 * terms.abs().sum(-1, keepdim=True) * wq.grad_factor
    assert ((wq.scale.grad - expect).abs() <= bound + 1e-12).all()


def test_scale_is_rounded_to_the_export_dtype_in_training():
    wq = sq.GroupWeightQuantizer(2, 64)
    with torch.no_grad():
        wq.scale.fill_(0.123456789)
    s = wq.effective_scale()
    assert torch.equal(s, torch.full_like(s, 0.123456789).bfloat16().float())
    s.sum().backward()
    assert torch.allclose(wq.scale.grad, torch.full_like(wq.scale, wq.grad_factor))  # straight through


def test_rejects_k_not_a_multiple_of_64():
    with pytest.raises(ValueError, match="divisible by 64"):
        sq.GroupWeightQuantizer(4, 96)
    with pytest.raises(ValueError, match="multiple of the group size 64"):
        sq.group_absmax_scale(torch.randn(2, 100))
