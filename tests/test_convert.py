"""Which layers a conversion touches, and the timestep plumbing."""

from __future__ import annotations

import torch
from tiny_models import tiny_wan, wan_inputs

from qvgen import QVGenConfig, QVGenLinear, convert_model
from qvgen.timestep import timestep_to_bucket


def test_wan_conversion_touches_every_linear_and_nothing_else(wan_model):
    linear_names = {n for n, m in wan_model.named_modules() if isinstance(m, torch.nn.Linear)}
    conv_before = {n for n, m in wan_model.named_modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.LayerNorm))}
    report = convert_model(wan_model, QVGenConfig(rank=4), progress=False)
    assert set(report.converted) == linear_names
    assert {"blocks.0.attn1.to_q", "blocks.1.ffn.net.2", "proj_out", "condition_embedder.time_proj"} <= set(
        report.converted
    )
    mods = dict(wan_model.named_modules())
    assert isinstance(mods["patch_embedding"], torch.nn.Conv3d)
    assert conv_before <= set(mods)
    assert all(isinstance(mods[n], QVGenLinear) for n in linear_names)


def test_modules_to_not_convert_patterns(wan_model):
    cfg = QVGenConfig(rank=0, modules_to_not_convert=["condition_embedder.*", "proj_out"])
    report = convert_model(wan_model, cfg, progress=False)
    assert "proj_out" in report.skipped and "condition_embedder.time_proj" in report.skipped
    assert all(not n.startswith("condition_embedder") for n in report.converted)
    assert type(dict(wan_model.named_modules())["proj_out"]) is torch.nn.Linear
    assert "left in full precision: 6" in str(report)


def test_cogvideox_conversion():
    from diffusers import CogVideoXTransformer3DModel

    m = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        sample_width=8,
        sample_height=8,
        sample_frames=5,
        text_embed_dim=32,
        time_embed_dim=16,
        max_text_seq_length=6,
    )
    names = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    report = convert_model(m, QVGenConfig(rank=4, n_buckets=10), progress=False)
    assert set(report.converted) == names
    x = torch.randn(1, 2, 4, 8, 8)
    out = m(x, torch.randn(1, 6, 32), torch.tensor([999]), return_dict=False)[0]
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_timestep_buckets_follow_the_model_input():
    model = tiny_wan()
    cfg = QVGenConfig(rank=0, n_buckets=10)
    convert_model(model, cfg, progress=False)
    layer = model.blocks[0].attn1.to_q
    x, t, e = wan_inputs(batch=2)
    model(x, torch.tensor([50.0, 999.0]), e)
    assert layer.timestep_state.bucket.tolist() == [0, 9]
    model(x[:1], torch.tensor([500.0]), e[:1])
    assert layer.timestep_state.bucket == 5
    assert timestep_to_bucket(1000.0, 10, 1000) == 9 and timestep_to_bucket(None, 10, 1000) == 0


def test_converted_model_close_to_fp_and_trains(wan_model):
    x, t, e = wan_inputs()
    with torch.no_grad():
        ref = wan_model(x, t, e, return_dict=False)[0]
    convert_model(wan_model, QVGenConfig(weight_bits=8, act_bits=8, rank=4), progress=False)
    out = wan_model(x, t, e, return_dict=False)[0]
    rel = (out - ref).pow(2).mean() / ref.pow(2).mean()
    assert rel < 1e-2  # W8A8 (with the 0.9025 initial clipping) stays close
    out.pow(2).mean().backward()
    layer = wan_model.blocks[0].attn1.to_q
    for p in (layer.weight, layer.weight_quantizer.scale, layer.phi_up, layer.act_quantizer.clip_logits):
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_quantization_mode_switches_error_sources(wan_model):
    from qvgen.surgery import quantization_mode

    x, t, e = wan_inputs()
    with torch.no_grad():
        ref = wan_model(x, t, e, return_dict=False)[0]
        convert_model(wan_model, QVGenConfig(rank=0), progress=False)
        with quantization_mode(wan_model, weights=False, acts=False):
            none = wan_model(x, t, e, return_dict=False)[0]
        with quantization_mode(wan_model, weights=True, acts=False):
            w_only = wan_model(x, t, e, return_dict=False)[0]
        with quantization_mode(wan_model, weights=False, acts=True):
            a_only = wan_model(x, t, e, return_dict=False)[0]
        both = wan_model(x, t, e, return_dict=False)[0]
    torch.testing.assert_close(none, ref)
    for y in (w_only, a_only):
        assert 0 < (y - ref).pow(2).mean() < (both - ref).pow(2).mean() * 1.5
