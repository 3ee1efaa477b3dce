"""NVFP4 (ComfyUI's `nvfp4`): fake quantization against comfy-kitchen, storage layout, gradients.

Equalities here are exact (`torch.equal`): quantize and dequantize are elementwise (a max per block,
divisions, roundings and one product per element, no sums), so the same float32 operations give the
same bits on every CPU. The reference is comfy-kitchen's eager backend, which every platform has.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import assert_matches_fake_quant, tiny_wan, wan_inputs

from qvgen import QVGenConfig, QVGenLinear, convert_model, export_comfy, load_quantized_model, pack_model
from qvgen.adapters.comfy.native import ComfyNativeError, read_comfy_native
from qvgen.config import ConfigError
from qvgen.schemes import nvfp4
from qvgen.schemes.nvfp4 import NVFP4Linear

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
    assert torch.equal(exported, act.input_scale().detach().reshape(())) and exported.shape == ()
    assert torch.allclose(exported, 0.2 * x.abs().amax() / 2688, rtol=1e-6)


# ---- the scheme: conversion, export in ComfyUI's format, loading ------------------------------------
CFG = dict(scheme="nvfp4", rank=0)


def _converted(rank=0, seed=3):
    """A tiny Wan converted to NVFP4, inputs calibrated by one forward, learned clips as after training."""
    model = tiny_wan()
    report = convert_model(model, QVGenConfig(**{**CFG, "rank": rank}), progress=False)
    x, t, e = wan_inputs()
    with torch.no_grad():
        model(x, t, e)  # first forward: every layer's input scale calibrates
        g = torch.Generator().manual_seed(seed)
        for m in model.modules():
            if isinstance(m, QVGenLinear):
                m.weight_quantizer.block_clip.uniform_(0.7, 1.0, generator=g)
                m.act_quantizer.clip.fill_(0.5 + float(torch.rand((), generator=g)))
    return model, report


def test_config_validation_names_the_field():
    assert QVGenConfig(scheme="nvfp4").scheme == "nvfp4"
    with pytest.raises(ConfigError, match="weight_bits: scheme 'nvfp4' stores 4-bit"):
        QVGenConfig(scheme="nvfp4", weight_bits=3)
    with pytest.raises(ConfigError, match="act_bits: scheme 'nvfp4'"):
        QVGenConfig(scheme="nvfp4", act_bits=8)
    with pytest.raises(ConfigError, match="act_bits: scheme 'nvfp4'"):
        QVGenConfig(scheme="nvfp4", act_bits=None)
    with pytest.raises(ConfigError, match="input_transform: scheme 'nvfp4' runs ComfyUI's nvfp4 layers"):
        QVGenConfig(scheme="nvfp4", input_transform="smooth")


def test_train_cli_scheme_flag():
    from qvgen.train.cli import build_parser, export_path, quant_config

    args = build_parser().parse_args(["--model", "m", "--scheme", "nvfp4", "--output", "out"])
    cfg = quant_config(args)
    assert cfg.scheme == "nvfp4" and cfg.input_transform == "none" and cfg.rank == 32
    assert export_path(args).as_posix() == "out/comfyui/diffusion_model_nvfp4.safetensors"
    with pytest.raises(ConfigError, match="act_bits"):
        quant_config(build_parser().parse_args(["--model", "m", "--scheme", "nvfp4", "--act-bits", "8"]))


def test_every_wan_layer_converts_and_phi_decays_before_export():
    model, report = _converted(rank=4)
    assert (
        not report.unsupported and len(report.converted) == 26
    )  # 10 per block + 6 embedding/head layers: K, out multiples of 16
    layer = model.blocks[0].attn1.to_q
    assert layer.rank == 4
    with pytest.raises(ValueError, match="Φ rank 4"):
        layer.export_tensors()
    layer.halve_phi(0)
    assert set(layer.export_tensors()) == {"weight", "weight_scale", "weight_scale_2", "input_scale", "bias"}


def test_qat_gradients_reach_weights_clips_and_phi():
    model = tiny_wan()
    convert_model(model, QVGenConfig(scheme="nvfp4", rank=4, n_buckets=1), progress=False)
    x, t, e = wan_inputs()
    model(x, t, e, return_dict=False)[0].square().mean().backward()
    layer = model.blocks[1].ffn.net[2]
    assert layer.weight.grad.abs().sum() > 0 and layer.phi_down.grad.abs().sum() > 0
    assert layer.weight_quantizer.block_clip.grad.abs().sum() > 0
    assert layer.act_quantizer.clip.grad is not None


def test_export_is_what_comfyui_reads_and_loads_back(tmp_path):
    """The file parsed as ComfyUI's loader does (comfy/ops.py `_load_quantized_module`, format nvfp4:
    `weight` as uint8, `weight_scale` viewed as fp8, `weight_scale_2`, then `input_scale` as an extra
    parameter), and loaded back by the project's loader: equal to the fake-quant model up to float
    summation order (`assert_matches_fake_quant`)."""
    model, _ = _converted()
    x, t, e = wan_inputs()
    with torch.no_grad():
        ref = model(x, t, e, return_dict=False)[0]
    report = export_comfy(model, QVGenConfig(**CFG), tmp_path / "wan.safetensors", dtype=torch.float32)
    assert "26 nvfp4 layers" in str(report) and not report.full_precision
    with safe_open(str(report.path), framework="pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(meta["_quantization_metadata"])["layers"]
    assert len(layers) == 26 and all(c == {"format": "nvfp4"} for c in layers.values())
    for name in layers:
        assert json.loads(sd[f"{name}.comfy_quant"].numpy().tobytes()) == {"format": "nvfp4"}
        w, s = sd[f"{name}.weight"], sd[f"{name}.weight_scale"]
        assert w.dtype == torch.uint8 and s.dtype == torch.float8_e4m3fn
        assert s.shape == (-(-w.shape[0] // 128) * 128, -(-w.shape[1] * 2 // 16 // 4) * 4)
        assert sd[f"{name}.weight_scale_2"].shape == () and sd[f"{name}.input_scale"].shape == ()
    assert "blocks.0.self_attn.q" in layers and "head.head" in layers
    loaded = load_quantized_model(report.path)
    assert isinstance(loaded.blocks[0].attn1.to_q, NVFP4Linear)
    with torch.no_grad():
        assert_matches_fake_quant(loaded(x, t, e, return_dict=False)[0], ref)
        pack_model(model, QVGenConfig(**CFG))  # in-memory packing gives the same layers
        assert isinstance(model.blocks[0].attn1.to_q, NVFP4Linear)
        assert_matches_fake_quant(model(x, t, e, return_dict=False)[0], ref)


def test_exported_layers_rebuilt_by_comfy_kitchen_match_the_loader(tmp_path):
    """Each exported layer rebuilt the way ComfyUI does it (a `QuantizedTensor` of
    `TensorCoreNVFP4Layout` from the file's tensors; its field names checked against the layout's
    `state_dict_tensors`), the input quantized by the layout with the file's `input_scale`, and run
    through comfy-kitchen's dequantized linear: equal to `NVFP4Linear` up to summation order (1e-6 of
    max |y|; the operands are bit-identical, asserted first)."""
    model, _ = _converted()
    path = export_comfy(model, QVGenConfig(**CFG), tmp_path / "wan.safetensors", dtype=torch.float32).path
    sd = read_comfy_native(path).state_dict
    loaded = load_quantized_model(path)
    x = torch.randn(6, 64) * 3
    pairs = (("blocks.1.self_attn.o", loaded.blocks[1].attn1.to_out[0]), ("head.head", loaded.proj_out))
    for name, layer in pairs:
        params = TensorCoreNVFP4Layout.Params(
            scale=sd[f"{name}.weight_scale_2"],
            orig_dtype=torch.float32,
            orig_shape=(layer.out_features, layer.in_features),
            block_scale=sd[f"{name}.weight_scale"],
        )
        stored = TensorCoreNVFP4Layout.state_dict_tensors(sd[f"{name}.weight"], params)
        assert {f"weight{k}" for k in stored} == {"weight", "weight_scale", "weight_scale_2"}
        with ck.registry.use_backend("eager"), torch.no_grad():
            wq = QuantizedTensor(sd[f"{name}.weight"], LAYOUT, params)
            xq = QuantizedTensor.from_float(x, LAYOUT, scale=sd[f"{name}.input_scale"])
            assert torch.equal(wq.dequantize(), layer.dequantize_weight())
            assert torch.equal(xq.dequantize(), nvfp4.fake_quant(x, layer.input_scale))
            ref = torch.nn.functional.linear(xq.dequantize(), wq.dequantize(), sd[f"{name}.bias"])
            y = layer(x)
        assert (y - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_loader_without_input_quantization_is_comfyuis_w4a16_path(tmp_path):
    model, _ = _converted()
    path = export_comfy(model, QVGenConfig(**CFG), tmp_path / "wan.safetensors", dtype=torch.float32).path
    w4a16 = load_quantized_model(path).blocks[0].ffn.net[0].proj
    w4a16.quantize_input = False
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = x @ w4a16.dequantize_weight().T + w4a16.bias
        assert torch.allclose(w4a16(x), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_export_refuses_uncalibrated_inputs_and_malformed_files_name_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_wan()
    convert_model(model, QVGenConfig(**CFG), progress=False)
    with pytest.raises(ComfyNativeError, match="input scale was never calibrated"):
        export_comfy(model, QVGenConfig(**CFG), tmp_path / "x.safetensors")
    model, _ = _converted()
    path = export_comfy(model, QVGenConfig(**CFG), tmp_path / "wan.safetensors").path
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    sd = load_file(str(path))
    sd["blocks.0.self_attn.k.weight_scale"] = sd["blocks.0.self_attn.k.weight_scale"][:64]
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ComfyNativeError, match=r"bad\.safetensors.*blocks\.0\.self_attn\.k\.weight_scale.*\(128, 4\)"):
        read_comfy_native(tmp_path / "bad.safetensors")


# ---- the Hub ---------------------------------------------------------------------------------------------
def test_hub_push_stages_the_comfyui_file_with_its_card(tmp_path):
    """`python -m qvgen.hub push RUN REPO --dry-run DIR` on a run whose export is an NVFP4 file: the repo
    is that file under comfyui/, the base model's license and a card that says how ComfyUI loads it."""
    from qvgen.hub import find_source, main

    model, _ = _converted()
    run = tmp_path / "run"
    export_comfy(model, QVGenConfig(**CFG), run / "comfyui" / "diffusion_model_nvfp4.safetensors")
    (run / "train_config.json").write_text(json.dumps({"options": {"steps": 60, "lr": 3e-5}, "quantization": {}}))
    base = tmp_path / "base"
    base.mkdir()
    (base / "LICENSE").write_text("Apache License 2.0 (test copy)\n")
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    src = find_source(run)
    assert src.comfy_file.name == "diffusion_model_nvfp4.safetensors" and src.run_dir == run
    assert main(["push", str(run), "org/wan-nvfp4", "--base-model", str(base), "--dry-run", str(tmp_path / "s")]) == 0
    staged = tmp_path / "s"
    assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()) == [
        "LICENSE",
        "README.md",
        "comfyui/wan-nvfp4.safetensors",
    ]
    assert read_comfy_native(staged / "comfyui" / "wan-nvfp4.safetensors").config.scheme == "nvfp4"
    card = (staged / "README.md").read_text()
    assert "ComfyUI-native `nvfp4`" in card and "stock **Load Diffusion Model**" in card
    assert "- nvfp4" in card and "| steps | 60 |" in card


@pytest.mark.slow
def test_train_cli_nvfp4_end_to_end(tmp_path):
    from tiny_models import tiny_wan_pipeline, write_clips

    from qvgen.train.cli import main

    pipe = tiny_wan_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    write_clips(tmp_path / "data", n=2, layout="jsonl")
    out = tmp_path / "run"
    args = ["--model", str(tmp_path / "pipe"), "--data", str(tmp_path / "data"), "--output", str(out)]
    args += ["--num-frames", "5", "--height", "32", "--width", "32", "--max-text-len", "8", "--steps", "4"]
    args += ["--rank", "4", "--checkpoint-every", "2", "--no-progress", "--scheme", "nvfp4"]
    assert main(args) == 0
    f = read_comfy_native(out / "comfyui" / "diffusion_model_nvfp4.safetensors")
    assert f.config.scheme == "nvfp4" and f.config.current_rank == 0
    assert all(c == {"format": "nvfp4"} for c in f.layers.values())
    assert all(float(f.state_dict[f"{n}.input_scale"]) > 0 for n in f.layers)  # calibrated in training
    assert isinstance(load_quantized_model(f.path).blocks[1].ffn.net[2], NVFP4Linear)
