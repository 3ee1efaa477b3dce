"""NVFP4 (ComfyUI's `nvfp4`): fake quantization against comfy-kitchen, storage layout, gradients.

Equalities here are exact (`torch.equal`): quantize and dequantize are elementwise (a max per block,
divisions, roundings and one product per element, no sums), so the same float32 operations give the
same bits on every CPU. The reference is comfy-kitchen's eager backend, which every platform has.
"""

from __future__ import annotations

import pytest
import torch

from qvgen.schemes import nvfp4

ck = pytest.importorskip("comfy_kitchen")
from comfy_kitchen.float_utils import from_blocked, to_blocked  # noqa: E402
from comfy_kitchen.tensor import QuantizedTensor, TensorCoreNVFP4Layout  # noqa: E402

LAYOUT = "TensorCoreNVFP4Layout"


def ck_pair(x: torch.Tensor, s2: torch.Tensor | None = None):
    """comfy-kitchen's quantize (its layout class: default global scale) and dequantize of `x`."""
    with ck.registry.use_backend("eager"):
        qt = QuantizedTensor.from_float(x, LAYOUT, scale=s2)
        return qt, qt.dequantize()


def uneven(rows, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g).mul(4)
    x[:, ::7] *= 20  # outlier channels, as real activations
    return x.to(dtype)


# ---- equality with comfy-kitchen -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 512), (16, 16), (144, 64)])
def test_fake_quant_and_stored_tensors_equal_comfy_kitchen(shape, dtype):
    x = uneven(*shape, dtype=dtype)
    qt, deq = ck_pair(x)
    assert torch.equal(nvfp4.fake_quant(x), deq) and nvfp4.fake_quant(x).dtype == dtype
    if dtype == torch.float32:
        t = nvfp4.quantize_weight(x)
        assert torch.equal(t["weight"], qt._qdata)
        assert torch.equal(t["weight_scale"].view(torch.uint8), qt._params.block_scale.view(torch.uint8))
        assert torch.equal(t["weight_scale_2"], qt._params.scale)
        assert torch.equal(nvfp4.dequantize_weight(t["weight"], t["weight_scale"], t["weight_scale_2"]), deq)


def test_adversarial_inputs_equal_comfy_kitchen():
    x = uneven(32, 256, seed=1)
    x[0, :16] = 0  # a zero block
    x[1, :] *= 1e-30  # blocks whose fp8 scale underflows to 0 or to a subnormal
    x[2, 5] = 1e6  # a huge outlier: the global scale follows it, small blocks lose precision
    x[3, 16:32] = -x[3, 16:32].abs()  # small negatives round to -0 (code 8), as comfy-kitchen stores them
    x[4, :] = torch.tensor([3.0e38, -3.0e38] * 128)  # near float32's max
    for s2 in (None, torch.tensor(1e-3), torch.tensor(0.5)):  # default, clipping, underflowing input scales
        qt, deq = ck_pair(x, s2)
        assert torch.equal(nvfp4.fake_quant(x, s2), deq)
        assert torch.isfinite(deq).all()


def test_all_zero_tensor_quantizes_to_zero_where_comfy_kitchen_returns_nan():
    x = torch.zeros(16, 32)
    _, deq = ck_pair(x)
    assert torch.isnan(deq).all()  # 0 / 0 global scale in comfy-kitchen
    assert torch.equal(nvfp4.fake_quant(x), x)
    t = nvfp4.quantize_weight(x)
    assert float(t["weight_scale_2"]) == 1.0
    assert torch.equal(nvfp4.dequantize_weight(t["weight"], t["weight_scale"], t["weight_scale_2"]), x)
    params = TensorCoreNVFP4Layout.Params(
        scale=t["weight_scale_2"], orig_dtype=torch.float32, orig_shape=(16, 32), block_scale=t["weight_scale"]
    )
    with ck.registry.use_backend("eager"):
        assert torch.equal(QuantizedTensor(t["weight"], LAYOUT, params).dequantize(), x)


def test_e2m1_ties_round_to_even_like_comfy_kitchen():
    # block max 6 and s2 = 2^-8: the block scale is 256 (exact in fp8), the total scale exactly 1, so
    # every value below is its own scaled value: the midpoints between grid points and their neighbours
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    spec = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0}  # even mantissa wins
    vals = torch.tensor(mids + [6.0], dtype=torch.float32)
    row = torch.cat([vals, -vals])
    up = torch.nextafter(row, torch.full_like(row, 100.0))
    down = torch.nextafter(row, torch.full_like(row, -100.0))
    x = torch.stack([row, up, down])
    s2 = torch.tensor(2.0**-8)
    _, deq = ck_pair(x, s2)
    ours = nvfp4.fake_quant(x, s2)
    assert torch.equal(ours, deq)
    assert ours[0, :7].tolist() == [spec[m] for m in mids]
    assert ours[0, 8:15].tolist() == [-spec[m] for m in mids]
    assert ours[1, :7].tolist() == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # just above a midpoint: up
    assert ours[2, :7].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]  # just below: down


def test_scale_swizzle_is_cublas_tiled_layout():
    s = torch.rand(200, 9)
    assert torch.equal(nvfp4.swizzle_scales(s), to_blocked(s, flatten=False))
    assert torch.equal(
        nvfp4.unswizzle_scales(to_blocked(s, flatten=False), 200, 9), from_blocked(to_blocked(s), 200, 9)
    )
    assert nvfp4.swizzle_scales(s).shape == (256, 12)
    with pytest.raises(ValueError, match=r"expected shape \(256, 12\)"):
        nvfp4.unswizzle_scales(torch.zeros(128, 12), 200, 9)


def test_packing_puts_the_even_column_in_the_high_nibble():
    codes = torch.tensor([[1, 9, 7, 15]], dtype=torch.uint8)
    assert nvfp4.pack_fp4(codes).tolist() == [[0x19, 0x7F]]
    assert torch.equal(nvfp4.unpack_fp4(nvfp4.pack_fp4(codes)), codes)
    assert nvfp4.e2m1_values(codes).tolist() == [[0.5, -0.5, 6.0, -6.0]]


def test_learned_clip_is_exported_as_what_comfy_kitchen_dequantizes():
    w = uneven(64, 128, seed=2)
    q = nvfp4.NVFP4WeightQuantizer(64, 128)
    with torch.no_grad():
        assert torch.equal(q(w), nvfp4.fake_quant(w))  # clip 1: comfy-kitchen's own quantizer
        q.block_clip.uniform_(0.5, 1.0, generator=torch.Generator().manual_seed(0))
        t = q.export(w)
        params = TensorCoreNVFP4Layout.Params(
            scale=t["weight_scale_2"], orig_dtype=torch.float32, orig_shape=(64, 128), block_scale=t["weight_scale"]
        )
        with ck.registry.use_backend("eager"):
            deq = QuantizedTensor(t["weight"], LAYOUT, params).dequantize()
        assert torch.equal(q(w), deq)
        assert not torch.equal(deq, nvfp4.fake_quant(w))  # the clip did change the scales


def test_linear_matches_comfy_kitchen_dequantized_linear():
    """ComfyUI's NVFP4 linear: input quantized with `input_scale`, weight dequantized. On CPU the eager
    `scaled_mm_nvfp4` cannot run (cuBLAS-swizzled scales), so the reference is comfy-kitchen's own
    fallback: `F.linear` on the dequantized operands. Same values, so only the matmul's summation order
    differs: relative 1e-6 of max |y| covers float32 sums of 256 terms."""
    w, x = uneven(48, 256, seed=3), uneven(10, 256, seed=4)
    t = nvfp4.quantize_weight(w)
    isc = x.abs().amax() / 2688 * 0.7
    params = TensorCoreNVFP4Layout.Params(
        scale=t["weight_scale_2"], orig_dtype=torch.float32, orig_shape=(48, 256), block_scale=t["weight_scale"]
    )
    with ck.registry.use_backend("eager"):
        wq = QuantizedTensor(t["weight"], LAYOUT, params)
        xq = QuantizedTensor.from_float(x, LAYOUT, scale=isc)
        ref = torch.nn.functional.linear(xq.dequantize(), wq.dequantize())
    y = nvfp4.nvfp4_linear(x, t["weight"], t["weight_scale"], t["weight_scale_2"], None, isc)
    assert (y - ref).abs().max() <= 1e-6 * ref.abs().max()
    y16 = nvfp4.nvfp4_linear(x, t["weight"], t["weight_scale"], t["weight_scale_2"], quantize_input=False)
    assert (y16 - x @ wq.dequantize().T).abs().max() <= 1e-6 * ref.abs().max()


# ---- gradients ---------------------------------------------------------------------------------------
def test_straight_through_gradient_of_the_input():
    """Identity inside the e2m1 range (up to the float rounding of `(g · s) / s`), exactly 0 where the
    value clamps at ±6 (a block's largest element clamps when its fp8 scale rounded down; more do
    under a clip < 1). Elements exactly at ±6 are left out."""
    x = uneven(8, 64, seed=5).requires_grad_(True)
    g = torch.randn(8, 64)
    for clip in (None, torch.full((8, 4), 0.5)):
        x.grad = None
        (nvfp4.fake_quant(x, clip=clip) * g).sum().backward()
        with torch.no_grad():
            s2 = nvfp4.global_scale(x)
            v = x.reshape(8, 4, 16).abs() / (s2 * nvfp4.block_scales(x, s2, clip)).unsqueeze(-1)
            v = v.reshape(8, 64)
        inside, out = v < 6, v > 6
        assert torch.allclose(x.grad[inside], g[inside], rtol=1e-6, atol=0)
        assert torch.equal(x.grad[out], torch.zeros_like(x.grad[out]))
        assert (v > 6).any() and (v < 6).sum() > 400


def test_block_clip_gradient_is_the_lsq_estimator():
    """d loss / d clip_b = gf · Σ_i g_i (q_i − v_i [v_i not clamped]) · amax_b / 6, with v_i = x_i / (s2 s_b)
    and q_i its e2m1 value: the LSQ step-size gradient through both straight-through roundings,
    written out here in float64 from the definitions."""
    w = uneven(16, 64, seed=6)
    q = nvfp4.NVFP4WeightQuantizer(16, 64)
    with torch.no_grad():
        q.block_clip.uniform_(0.6, 1.0, generator=torch.Generator().manual_seed(1))
    g = torch.randn(16, 64)
    (q(w) * g).sum().backward()
    with torch.no_grad():
        s2 = nvfp4.global_scale(w)
        clip = q.block_clip.detach()
        sb = nvfp4.block_scales(w, s2, clip).double()
        v = w.double().reshape(16, 4, 16) / (s2.double() * sb).unsqueeze(-1)
        qv = nvfp4.round_e2m1(v.clamp(-6, 6).float()).double()
        amax = w.reshape(16, 4, 16).abs().amax(-1).double()
        expected = (g.double().reshape(16, 4, 16) * (qv - v * (v.abs() < 6))).sum(-1) * amax / 6 * q.grad_factor
    assert torch.allclose(q.block_clip.grad.double(), expected, rtol=1e-4, atol=1e-6 * expected.abs().max())


def test_input_scale_learns_to_stop_clipping():
    x = uneven(32, 128, seed=7)
    act = nvfp4.NVFP4ActQuantizer(128)
    act(x)  # first batch calibrates
    assert float(act.amax) == float(x.abs().amax())
    assert torch.equal(act(x), nvfp4.fake_quant(x, x.abs().amax() / 2688))
    with torch.no_grad():
        act.clip.fill_(0.2)  # clips the largest blocks
    loss = torch.nn.functional.mse_loss(act(x), x)
    loss.backward()
    assert act.clip.grad < 0  # a larger scale lowers the error
    exported = act.export_scale()  # the exact value the forward used: ComfyUI quantizes with it
    assert torch.equal(exported, act.input_scale().detach()) and exported.shape == ()
    assert torch.allclose(exported, 0.2 * x.abs().amax() / 2688, rtol=1e-6)
