"""Export → load reproduces the fake-quant model; malformed checkpoints fail clearly and safely."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import assert_matches_fake_quant, tiny_wan, wan_inputs

from qvgen import (
    CheckpointError,
    PackedLinear,
    QVGenConfig,
    convert_model,
    load_checkpoint,
    load_quantized_model,
    pack_model,
    save_quantized,
)
from qvgen.config import ConfigError


def _trained_like(rank=4, act_bits=4, n_buckets=4):
    model = tiny_wan()
    cfg = QVGenConfig(rank=rank, act_bits=act_bits, n_buckets=n_buckets)
    convert_model(model, cfg, progress=False)
    g = torch.Generator().manual_seed(3)
    for m in model.modules():  # make the learnable parts non-trivial, as after training
        if getattr(m, "act_quantizer", None) is not None:
            m.act_quantizer.clip_logits.data = torch.rand(m.act_quantizer.clip_logits.shape, generator=g) * 4
    return model, cfg


@pytest.mark.parametrize("single_file", [False, True])
@pytest.mark.parametrize(("rank", "act_bits"), [(4, 4), (0, 4), (4, None)])
def test_export_load_matches_fake_quant(tmp_path, single_file, rank, act_bits):
    model, cfg = _trained_like(rank=rank, act_bits=act_bits)
    x, t, e = wan_inputs()
    with torch.no_grad():
        ref = model(x, t, e, return_dict=False)[0]
    path = tmp_path / ("ckpt.safetensors" if single_file else "ckpt")
    save_quantized(model, cfg, path, dtype=torch.float32)
    loaded = load_quantized_model(path)
    assert isinstance(loaded.blocks[0].ffn.net[0].proj, PackedLinear)
    assert loaded.blocks[0].attn1.to_q.rank == min(rank, 64)
    with torch.no_grad():
        out = loaded(x, t, e, return_dict=False)[0]
    assert_matches_fake_quant(out, ref)


def test_pack_in_place_matches(tmp_path):
    model, cfg = _trained_like()
    x, t, e = wan_inputs()
    with torch.no_grad():
        ref = model(x, t, e, return_dict=False)[0]
        pack_model(model, cfg)
        out = model(x, t, e, return_dict=False)[0]
    assert_matches_fake_quant(out, ref)


def test_checkpoint_contents_and_size(tmp_path):
    model, cfg = _trained_like(rank=0)
    save_quantized(model, cfg, tmp_path / "c")
    ckpt = load_checkpoint(tmp_path / "c")
    assert ckpt.config.current_rank == 0 and ckpt.config.weight_bits == 4
    q = ckpt.state_dict["blocks.0.attn1.to_q.qweight"]
    assert q.dtype == torch.uint8 and q.shape == (64, 32)  # 64 inputs packed two per byte
    assert "blocks.0.attn1.to_q.phi_down" not in ckpt.state_dict
    cfg_json = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg_json["_class_name"] == "WanTransformer3DModel"
    assert cfg_json["quantization_config"]["quant_method"] == "qvgen"


def _single(tmp_path):
    model, cfg = _trained_like(rank=0)
    path = tmp_path / "m.safetensors"
    save_quantized(model, cfg, path)
    return path


def _rewrite(path, mutate_tensors=None, mutate_meta=None):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_meta:
        mutate_meta(meta)
    save_file(tensors, str(path), metadata=meta)


def test_truncated_file_error_names_file(tmp_path):
    path = _single(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="m.safetensors.*not a readable safetensors"):
        load_checkpoint(path)


def test_missing_tensor_named(tmp_path):
    path = _single(tmp_path)
    _rewrite(path, lambda t: t.pop("blocks.1.attn2.to_k.weight_zero"))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn2\.to_k\.weight_zero.*missing"):
        load_checkpoint(path)


def test_missing_qweight_named(tmp_path):
    """Without its qweight a layer would pass for a full-precision layer and fail only when run."""
    path = _single(tmp_path)
    _rewrite(path, lambda t: t.pop("blocks.0.ffn.net.2.qweight"))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.net\.2\.qweight': expected a tensor.*got nothing"):
        load_checkpoint(path)


def test_wrong_shape_named(tmp_path):
    path = _single(tmp_path)
    _rewrite(path, lambda t: t.__setitem__("proj_out.weight_scale", torch.ones(3)))
    with pytest.raises(CheckpointError, match=r"proj_out\.weight_scale.*expected .*shape \(16,\)"):
        load_checkpoint(path)


def test_unknown_format_version(tmp_path):
    path = _single(tmp_path)

    def bump(meta):
        q = json.loads(meta["quantization_config"])
        q["format_version"] = 99
        meta["quantization_config"] = json.dumps(q)

    _rewrite(path, mutate_meta=bump)
    with pytest.raises(CheckpointError, match="format_version.*99"):
        load_checkpoint(path)


def test_not_a_qvgen_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="plain.safetensors.*quantization_config"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_config_mismatch_with_model(tmp_path):
    """A checkpoint whose layer shapes disagree with the model config is refused by name."""
    model, cfg = _trained_like(rank=0)
    save_quantized(model, cfg, tmp_path / "c")
    cfg_file = tmp_path / "c" / "config.json"
    data = json.loads(cfg_file.read_text())
    data["ffn_dim"] = 96
    cfg_file.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"ffn.*expected shape"):
        load_quantized_model(tmp_path / "c")


def test_config_validation_errors():
    with pytest.raises(ConfigError, match="weight_bits"):
        QVGenConfig(weight_bits=9)
    with pytest.raises(ConfigError, match="unknown field"):
        QVGenConfig.from_dict({"weight_bit": 4})
    with pytest.raises(ConfigError, match="decay_factor"):
        QVGenConfig(decay_factor=1.5)
    cfg = QVGenConfig(act_bits=None, modules_to_not_convert=["proj_out"])
    assert QVGenConfig.from_json(cfg.to_json()) == cfg


def test_failed_write_leaves_existing_checkpoint_intact(tmp_path, monkeypatch):
    path = _single(tmp_path)
    before = path.read_bytes()
    model, cfg = _trained_like(rank=0)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("qvgen.checkpoint.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, cfg, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind
