"""ComfyUI's native ConvRot W4A4 scheme: arithmetic vs references, QAT, export in ComfyUI's format, loading.

Tolerances (float32 throughout):
- the rotation alone changes a layer's output by ≤ 1e-5 relative (float summation order);
- fake-quant forward vs comfy-kitchen's eager `convrot_w4a4_linear` and vs the spec reference below,
  on the same weights: max |Δ| ≤ 1e-5 · max |y| (the integer sums are exact; only the order of the
  float scalings differs); weight codes and scales are bit-identical to `quantize_convrot_w4a4_weight`;
- export → load of a whole tiny Wan: `assert_matches_fake_quant` (median |Δ| ≤ 1e-5, relative L2 ≤ 2e-3).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from tiny_models import assert_matches_fake_quant, tiny_wan, wan_inputs

from qvgen import (
    CheckpointError,
    ConvRotLinear,
    QVGenConfig,
    QVGenLinear,
    convert_model,
    export_comfy,
    load_checkpoint,
    load_quantized_model,
    pack_model,
    save_quantized,
)
from qvgen.adapters.comfy.native import ComfyNativeError, read_comfy_native
from qvgen.config import FORMAT_VERSION, ConfigError
from qvgen.schemes import convrot

CFG = dict(scheme="convrot_w4a4", rank=0)


# ---- an independent reference, written from the spec (no code shared with qvgen.schemes.convrot) --------
def spec_hadamard(n: int) -> torch.Tensor:
    """Entry (i, j) of H4^{⊗k}/√n is the product over base-4 digits of H4[i_d, j_d], over √n."""
    h4 = [[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]]
    k = round(math.log(n, 4))
    out = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            v, a, b = 1, i, j
            for _ in range(k):
                v *= h4[a % 4][b % 4]
                a, b = a // 4, b // 4
            out[i, j] = v
    return out / math.sqrt(n)


def spec_linear(x, w, b, act_bits=4, w_scale=None):
    """ConvRot as the spec states it, in float64: rotate, absmax int4 rows/tokens, integer sum."""
    h = spec_hadamard(256)
    k = w.shape[1]
    blk = torch.block_diag(*[h] * (k // 256))
    wr, xr = w.double() @ blk, x.double().reshape(-1, k) @ blk
    sw = wr.abs().amax(1, keepdim=True) / 7 if w_scale is None else w_scale.double().reshape(-1, 1)
    qw = torch.clamp(torch.round(wr / sw), -7, 7)
    qa = 2 ** (act_bits - 1) - 1
    sx = xr.abs().amax(1, keepdim=True) / qa
    qx = torch.clamp(torch.round(xr / sx), -qa, qa)
    y = (qx @ qw.T) * sx * sw.T + (0 if b is None else b.double())
    return y.reshape(*x.shape[:-1], w.shape[0])


def _layer(k=512, n=96, seed=0, act_bits=4, rank=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    cfg = QVGenConfig(scheme="convrot_w4a4", rank=rank, act_bits=act_bits)
    return lin, QVGenLinear.from_linear(lin, cfg), cfg


def _close(a, b, tol=1e-5):
    err = float((a.double() - b.double()).abs().max())
    assert err <= tol * float(b.abs().max()), f"max |Δ| = {err:.3g} vs max |y| = {float(b.abs().max()):.3g}"
    return err


# ---- arithmetic ------------------------------------------------------------------------------------
def test_regular_hadamard_matches_spec_and_is_an_involution():
    h = convrot.regular_hadamard(256, dtype=torch.float64)
    assert torch.equal(h, spec_hadamard(256))
    assert torch.allclose(h @ h, torch.eye(256, dtype=torch.float64), atol=1e-12)  # symmetric and orthogonal
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / 16))
    with pytest.raises(ValueError, match="power of 4"):
        convrot.regular_hadamard(128)


def test_rotation_leaves_full_precision_output_unchanged():
    lin, layer, _ = _layer()
    layer.quantize_weights = layer.quantize_acts = False
    x = torch.randn(4, 9, 512)
    with torch.no_grad():
        _close(layer(x), lin(x))
        assert not torch.allclose(layer.weight, lin.weight)  # the stored weight is the rotated one


def test_pack_int4_layout():
    q = torch.tensor([[1, -2, 7, -7, 0, -8]], dtype=torch.int8)
    p = convrot.pack_int4(q)
    assert p.dtype == torch.int8 and p.shape == (1, 3)
    assert p.view(torch.uint8).tolist() == [[0xE1, 0x97, 0x80]]  # even column in the low nibble
    assert torch.equal(convrot.unpack_int4(p), q)


@pytest.mark.parametrize("act_bits", [4, 8])
def test_fake_quant_matches_spec_reference(act_bits):
    lin, layer, _ = _layer(act_bits=act_bits)
    with torch.no_grad():
        layer.weight_quantizer.scale.mul_(0.9)  # a learned (clipping) scale: exported as is
        x = torch.randn(3, 7, 512)
        ref = spec_linear(x, lin.weight, lin.bias, act_bits, layer.weight_quantizer.export_scale())
        _close(layer(x), ref)
        t = layer.export_tensors()
        packed = ConvRotLinear(512, 96, True, act_bits)
        packed.load_state_dict(t)
        _close(packed(x), ref)


def test_fake_quant_matches_comfy_kitchen_eager():
    ck = pytest.importorskip("comfy_kitchen")
    lin, layer, _ = _layer()
    w = lin.weight.detach()
    qw, sw = ck.quantize_convrot_w4a4_weight(w, 256, 64)
    t = layer.export_tensors()
    assert torch.equal(t["weight"], qw) and torch.equal(t["weight_scale"], sw)  # bit-identical export
    x = torch.randn(5, 512)
    with ck.registry.use_backend("eager"), torch.no_grad():
        ref = ck.convrot_w4a4_linear(x, qw, sw, lin.bias.detach(), 256, 64)
        _close(layer(x), ref)
        layer.weight_quantizer.scale.mul_(0.85)  # learned scale: ComfyUI runs whatever is exported
        t = layer.export_tensors()
        ref = ck.convrot_w4a4_linear(x, t["weight"], t["weight_scale"], t["bias"], 256, 64)
        _close(layer(x), ref)
        _close(convrot.convrot_linear(x, t["weight"], t["weight_scale"], t["bias"]), ref)
        deq = ck.dequantize_convrot_w4a4_weight(t["weight"], t["weight_scale"], 256, 64)
        ours = ConvRotLinear(512, 96, True)
        ours.load_state_dict(t)
        _close(ours.dequantize_weight(), deq)


# ---- QAT -------------------------------------------------------------------------------------------
def test_qat_gradients_flow_and_loss_decreases():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    student = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    student.load_state_dict(teacher.state_dict())
    report = convert_model(student, QVGenConfig(scheme="convrot_w4a4", rank=8, n_buckets=1), progress=False)
    assert len(report.converted) == 2
    x = torch.randn(64, 256) * torch.linspace(0.1, 3, 256)  # uneven channels, as real activations
    with torch.no_grad():
        target = teacher(x)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(student(x), target)
        opt.zero_grad()
        loss.backward()
        losses.append(float(loss))
        opt.step()
    layer = student[0]
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.weight_quantizer.scale.grad.abs().sum() > 0
    assert layer.phi_down.grad.abs().sum() > 0
    assert losses[-1] < 0.7 * losses[0], losses


def test_phi_decays_to_zero_and_export_requires_it():
    _, layer, _ = _layer(rank=4)
    assert layer.rank == 4
    with pytest.raises(ValueError, match="Φ rank 4"):
        layer.export_tensors()
    layer.halve_phi(2)
    assert layer.rank == 2
    layer.halve_phi(0)
    assert layer.rank == 0 and layer.phi_down is None
    assert set(layer.export_tensors()) == {"weight", "weight_scale", "bias"}


# ---- export in ComfyUI's format and loading -------------------------------------------------------
def _wan256():
    """A tiny Wan with hidden size 256: every block layer has K ∈ {256, 512}; the text and time
    embedders' first layers (K = 32) cannot be ConvRot and stay in full precision."""
    return tiny_wan(num_attention_heads=2, attention_head_dim=128, ffn_dim=512)


def _converted(rank=0):
    model = _wan256()
    report = convert_model(model, QVGenConfig(**{**CFG, "rank": rank}), progress=False)
    g = torch.Generator().manual_seed(3)
    for m in model.modules():  # learned scales, as after training
        if isinstance(m, QVGenLinear):
            m.weight_quantizer.scale.data *= 0.8 + 0.3 * torch.rand(m.weight_quantizer.scale.shape, generator=g)
    return model, report


def test_conversion_reports_layers_left_in_full_precision():
    model, report = _converted()
    assert sorted(report.unsupported) == [
        "condition_embedder.text_embedder.linear_1",
        "condition_embedder.time_embedder.linear_1",
    ]
    assert "ConvRot needs in_features divisible by 256" in str(report)
    assert isinstance(model.condition_embedder.text_embedder.linear_1, torch.nn.Linear)
    assert isinstance(model.blocks[0].ffn.net[2], QVGenLinear)


def test_export_load_round_trip_matches_fake_quant(tmp_path):
    model, _ = _converted()
    x, t, e = wan_inputs()
    with torch.no_grad():
        ref = model(x, t, e, return_dict=False)[0]
    report = export_comfy(model, QVGenConfig(**CFG), tmp_path / "wan.safetensors", dtype=torch.float32)
    assert report.bytes == (tmp_path / "wan.safetensors").stat().st_size
    assert set(report.full_precision) == {"text_embedding.0", "time_embedding.0"}
    assert "not a multiple of 256" in str(report)
    loaded = load_quantized_model(tmp_path / "wan.safetensors")
    assert isinstance(loaded.blocks[0].attn1.to_q, ConvRotLinear)
    with torch.no_grad():
        out = loaded(x, t, e, return_dict=False)[0]
        assert_matches_fake_quant(out, ref)
        pack_model(model, QVGenConfig(**CFG))  # in-memory packing gives the same layers
        assert isinstance(model.blocks[0].attn1.to_q, ConvRotLinear)
        assert_matches_fake_quant(model(x, t, e, return_dict=False)[0], ref)


def test_bf16_export_is_what_comfyui_loads(tmp_path):
    """Parse the file the way ComfyUI's loader does (comfy/utils.py convert_old_quants, then
    comfy/ops.py _load_quantized_module for format convrot_w4a4, comfy/model_detection.py for Wan)."""
    model, _ = _converted()
    path = export_comfy(model, QVGenConfig(**CFG), tmp_path / "wan.safetensors").path
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    qmeta = json.loads(meta["_quantization_metadata"])
    layers = qmeta["layers"]
    assert (
        qmeta["format_version"] == "1.0" and len(layers) == 2 * 10 + 4
    )  # 10 per block; text/time 2nd layers, time_projection, head
    for k, v in layers.items():  # convert_old_quants: metadata → comfy_quant tensors
        assert json.loads(sd[f"{k}.comfy_quant"].numpy().tobytes()) == v
    for name, conf in layers.items():
        assert conf == {"format": "convrot_w4a4", "convrot_groupsize": 256}
        w, s = sd[f"{name}.weight"], sd[f"{name}.weight_scale"]
        assert w.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (w.shape[0],)
        assert (w.shape[1] * 2) % 256 == 0
        extra = {k[len(name) + 1 :] for k in sd if k.startswith(name + ".")} - {"weight", "weight_scale", "comfy_quant"}
        assert extra <= {"bias"}
        if "bias" in extra:
            assert sd[f"{name}.bias"].dtype == torch.bfloat16
    # ComfyUI's own Wan names; detection reads head.modulation, head.head.weight, blocks.0.ffn.0.weight
    assert "blocks.0.self_attn.q" in layers and "head.head" in layers
    assert sd["head.modulation"].shape[-1] == 256
    assert sd["blocks.0.ffn.0.weight"].shape[0] == 512
    assert sd["text_embedding.0.weight"].dtype == torch.bfloat16 and "text_embedding.0.comfy_quant" not in sd
    assert not any("scale_shift_table" in k or "attn1" in k for k in sd)
    assert json.loads(meta["quantization_config"])["scheme"] == "convrot_w4a4"


def test_exported_layers_run_identically_in_comfy_kitchen(tmp_path):
    ck = pytest.importorskip("comfy_kitchen")
    model, _ = _converted()
    path = export_comfy(model, QVGenConfig(**CFG), tmp_path / "wan.safetensors", dtype=torch.float32).path
    f = read_comfy_native(path)
    loaded = load_quantized_model(path)
    x = torch.randn(6, 256)
    with ck.registry.use_backend("eager"), torch.no_grad():
        for name, layer in (("blocks.1.self_attn.o", loaded.blocks[1].attn1.to_out[0]), ("head.head", loaded.proj_out)):
            sd = f.state_dict
            ref = ck.convrot_w4a4_linear(x, sd[f"{name}.weight"], sd[f"{name}.weight_scale"], sd[f"{name}.bias"])
            _close(layer(x), ref)


def test_int8_tokens_are_recorded_for_comfyui(tmp_path):
    model = _wan256()
    cfg = QVGenConfig(scheme="convrot_w4a4", rank=0, act_bits=8)
    convert_model(model, cfg, progress=False)
    path = export_comfy(model, cfg, tmp_path / "a8.safetensors").path
    f = read_comfy_native(path)
    assert all(c.get("linear_dtype") == "int8" for c in f.layers.values())
    assert load_quantized_model(path).blocks[0].attn1.to_q.act_bits == 8


def test_export_refuses_live_phi_and_wrong_targets(tmp_path):
    model, _ = _converted(rank=4)
    with pytest.raises(ComfyNativeError, match="Φ rank"):
        export_comfy(model, QVGenConfig(**CFG), tmp_path / "x.safetensors")
    with pytest.raises(ComfyNativeError, match="Φ rank"):  # a folder path: its diffusers folder, refused alike
        save_quantized(model, QVGenConfig(**CFG), tmp_path / "folder")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_save_quantized_dispatches_and_load_checkpoint_points_to_the_right_loader(tmp_path):
    model, _ = _converted()
    path = save_quantized(model, QVGenConfig(**CFG), tmp_path / "wan.safetensors")
    with pytest.raises(CheckpointError, match="ComfyUI-native checkpoint.*convrot_w4a4.*Load Diffusion Model"):
        load_checkpoint(path)


def test_malformed_native_file_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = _converted()
    path = export_comfy(model, QVGenConfig(**CFG), tmp_path / "wan.safetensors").path
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    sd = load_file(str(path))
    del sd["blocks.0.self_attn.k.weight_scale"]
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ComfyNativeError, match=r"bad\.safetensors.*blocks\.0\.self_attn\.k\.weight_scale.*missing"):
        read_comfy_native(tmp_path / "bad.safetensors")


# ---- config and old checkpoints -------------------------------------------------------------------
def test_config_scheme_field():
    assert QVGenConfig().scheme == "qvgen"
    old = QVGenConfig().to_dict()
    del old["scheme"]
    old["format_version"] = 1
    assert QVGenConfig.from_dict(old).scheme == "qvgen"  # version-1 configs have no scheme
    with pytest.raises(ConfigError, match=r"scheme: expected one of \[.*'convrot_w4a4'.*\], got 'convrot'"):
        QVGenConfig(scheme="convrot")
    with pytest.raises(ConfigError, match="weight_bits"):
        QVGenConfig(scheme="convrot_w4a4", weight_bits=3)
    with pytest.raises(ConfigError, match="act_bits"):
        QVGenConfig(scheme="convrot_w4a4", act_bits=None)
    with pytest.raises(ConfigError, match="input_transform"):
        QVGenConfig(scheme="convrot_w4a4", input_transform="hadamard")
    for scheme in ("convrot_w4a4", "nvfp4"):  # formats without a low-rank branch: Φ must reach rank 0
        with pytest.raises(ConfigError, match=f"final_rank: scheme '{scheme}' has no low-rank branch"):
            QVGenConfig(scheme=scheme, rank=8, final_rank=4)


def test_old_version1_checkpoint_without_scheme_still_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_wan()
    cfg = QVGenConfig(rank=0, n_buckets=2)
    convert_model(model, cfg, progress=False)
    x, t, e = wan_inputs()
    with torch.no_grad():
        ref = model(x, t, e, return_dict=False)[0]
    path = save_quantized(model, cfg, tmp_path / "new.safetensors", dtype=torch.float32)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    q = json.loads(meta["quantization_config"])
    assert q["format_version"] == FORMAT_VERSION and q["scheme"] == "qvgen"
    del q["scheme"]
    q["format_version"] = 1  # exactly what an older release wrote
    meta["quantization_config"] = json.dumps(q)
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata=meta)
    assert load_checkpoint(tmp_path / "old.safetensors").config.scheme == "qvgen"
    with torch.no_grad():
        out = load_quantized_model(tmp_path / "old.safetensors")(x, t, e, return_dict=False)[0]
    assert_matches_fake_quant(out, ref)


# ---- the training CLI --------------------------------------------------------------------------------
def test_train_cli_scheme_flag():
    from qvgen.train.cli import build_parser, export_path, quant_config

    args = build_parser().parse_args(["--model", "m", "--scheme", "convrot_w4a4", "--act-bits", "8"])
    cfg = quant_config(args)
    assert cfg.scheme == "convrot_w4a4" and cfg.act_bits == 8
    assert export_path(args).name.endswith(".safetensors")
    assert quant_config(build_parser().parse_args(["--model", "m"])).scheme == "qvgen"
    with pytest.raises(ConfigError, match="act_bits"):
        quant_config(build_parser().parse_args(["--model", "m", "--scheme", "convrot_w4a4", "--act-bits", "3"]))


@pytest.mark.slow
def test_train_cli_convrot_end_to_end(tmp_path):
    from tiny_models import tiny_wan_pipeline, write_clips

    from qvgen.train.cli import main

    pipe = tiny_wan_pipeline()
    pipe.transformer = _wan256()
    pipe.save_pretrained(tmp_path / "pipe")
    write_clips(tmp_path / "data", n=2, layout="jsonl")
    out = tmp_path / "run"
    args = ["--model", str(tmp_path / "pipe"), "--data", str(tmp_path / "data"), "--output", str(out)]
    args += ["--num-frames", "5", "--height", "32", "--width", "32", "--max-text-len", "8", "--steps", "4"]
    args += ["--rank", "4", "--checkpoint-every", "2", "--no-progress", "--scheme", "convrot_w4a4"]
    assert main(args) == 0
    path = out / "comfyui" / "diffusion_model_convrot_w4a4.safetensors"
    f = read_comfy_native(path)
    assert len(f.layers) == 24 and f.config.scheme == "convrot_w4a4" and f.config.current_rank == 0
    assert isinstance(load_quantized_model(path).blocks[1].ffn.net[2], ConvRotLinear)
