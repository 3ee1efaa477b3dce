"""The diffusers backend: registration, from_pretrained / save_pretrained, pipelines, malformed input."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_cogvideox_pipeline, tiny_wan, tiny_wan_pipeline, wan_inputs
from torch import nn

import qvgen
from qvgen import CheckpointError, ConfigError, PackedLinear, QVGenConfig, convert_model, pack_model, save_quantized

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DiffusionPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.quantizers.base import DiffusersQuantizer  # noqa: E402

from qvgen.diffusers_backend import QVGenQuantizationConfig, QVGenQuantizer  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"


def packed(model: nn.Module, rank: int = 4, n_buckets: int = 4) -> tuple[nn.Module, QVGenConfig]:
    """A model in QVGen's packed inference form (Φ still at `rank`, so Φ tensors are exercised)."""
    cfg = QVGenConfig(weight_bits=4, act_bits=4, rank=rank, n_buckets=n_buckets)
    convert_model(model, cfg, progress=False)
    pack_model(model, cfg)
    return model.eval(), cfg


def run_wan(model: nn.Module, t: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x, _, e = wan_inputs(batch=1)
    with torch.no_grad():
        return model(x.to(dtype), torch.tensor([t]), e.to(dtype), return_dict=False)[0].float()


@pytest.fixture(scope="module")
def wan_template(tmp_path_factory):
    model, cfg = packed(tiny_wan())
    folder = tmp_path_factory.mktemp("wan") / "repo"
    save_quantized(model, cfg, folder / "transformer", dtype=torch.float32)
    return folder, model


@pytest.fixture
def wan_ckpt(tmp_path, wan_template):
    """(folder with transformer/, in-memory packed model) for the tiny Wan; the folder is a fresh copy."""
    folder, model = wan_template
    shutil.copytree(folder, tmp_path / "repo")
    return tmp_path / "repo", model


# ---- registration and config -------------------------------------------------------------------
def test_import_qvgen_is_lazy_and_registers_when_diffusers_loads():
    code = (
        "import sys, qvgen\n"
        "assert 'diffusers' not in sys.modules, 'import qvgen imported diffusers'\n"
        "from diffusers import WanTransformer3DModel\n"
        "from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING as Q, AUTO_QUANTIZATION_CONFIG_MAPPING as C\n"
        "print(Q['qvgen'].__name__, C['qvgen'].__name__, qvgen.diffusers_backend.is_registered())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["QVGenQuantizer", "QVGenQuantizationConfig", "True"]


def test_registered_in_process_and_other_backends_untouched():
    from diffusers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert qvgen.diffusers_backend.is_registered()
    assert AUTO_QUANTIZER_MAPPING["qvgen"] is QVGenQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["qvgen"] is QVGenQuantizationConfig
    assert {"bitsandbytes_4bit", "gguf", "torchao"} <= set(AUTO_QUANTIZER_MAPPING)
    assert set(AUTO_QUANTIZER_MAPPING) == set(AUTO_QUANTIZATION_CONFIG_MAPPING)


def test_install_registers_at_once_when_diffusers_is_loaded_and_failures_only_warn(monkeypatch):
    from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    backend = qvgen.diffusers_backend
    monkeypatch.delitem(AUTO_QUANTIZER_MAPPING, "qvgen")
    assert not backend.is_registered()
    backend.install()  # diffusers' quantizer module is already imported: no hook, immediate registration
    assert backend.is_registered() and backend._finder is None

    def broken():
        raise AttributeError("AUTO_QUANTIZER_MAPPING moved")

    monkeypatch.setattr(backend, "register", broken)
    with pytest.warns(RuntimeWarning, match="could not register its diffusers quantizer"):
        backend.install()


def test_quantization_config_is_both_a_qvgen_and_a_diffusers_config():
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin

    cfg = QVGenQuantizationConfig(weight_bits=4, act_bits=4, n_buckets=8)
    assert isinstance(cfg, QVGenConfig) and isinstance(cfg, QuantizationConfigMixin)
    assert cfg.quant_method == "qvgen" and cfg.quant_method.value == "qvgen"
    d = cfg.to_dict()
    assert d == QVGenConfig(weight_bits=4, act_bits=4, n_buckets=8).to_dict()
    assert json.loads(cfg.to_json_string())["quant_method"] == "qvgen"
    assert QVGenQuantizationConfig.from_dict(d).n_buckets == 8
    assert QVGenQuantizationConfig.from_qvgen_config(QVGenConfig(act_bits=None)).act_bits is None
    with pytest.raises(ConfigError, match="unknown field.*bogus"):
        QVGenQuantizationConfig.from_dict({**d, "bogus": 1})


# ---- from_pretrained / save_pretrained ------------------------------------------------------------
def test_from_pretrained_equals_in_memory_and_builds_on_meta(wan_ckpt, monkeypatch):
    folder, model = wan_ckpt
    seen = {}
    from qvgen.diffusers_backend import quantizer as qmod

    real = qmod.build_packed_model

    def spy(m, *a, **k):
        seen["devices"] = {p.device.type for p in m.parameters()}
        return real(m, *a, **k)

    monkeypatch.setattr(qmod, "build_packed_model", spy)
    loaded = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    assert seen["devices"] == {"meta"}  # shells built before any weight exists: no full-precision copy
    q = {n for n, m in loaded.named_modules() if isinstance(m, PackedLinear)}
    assert q == {n for n, m in model.named_modules() if isinstance(m, PackedLinear)} and len(q) > 20
    assert loaded.blocks[0].attn1.to_q.rank == 4
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    for t in (100.0, 800.0):  # two different clipping buckets
        assert torch.equal(run_wan(loaded, t), run_wan(model, t))


def test_bf16_load_keeps_quantizer_tensors_fp32(wan_ckpt):
    folder, model = wan_ckpt
    loaded = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.bfloat16)
    layer = loaded.blocks[0].attn1.to_q
    assert layer.weight_scale.dtype == layer.weight_zero.dtype == layer.act_clip.dtype == torch.float32
    assert layer.qweight.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16
    assert loaded.condition_embedder.time_embedder.linear_1.bias.dtype == torch.float32  # _keep_in_fp32_modules
    ref, out = run_wan(model, 300.0), run_wan(loaded, 300.0, torch.bfloat16)
    assert (out - ref).norm() / ref.norm() < 0.2


def test_save_pretrained_writes_the_qvgen_format(wan_ckpt, tmp_path):
    folder, model = wan_ckpt
    loaded = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    loaded.save_pretrained(tmp_path / "resaved")
    ckpt = qvgen.load_checkpoint(tmp_path / "resaved")  # the core reader validates every tensor
    assert ckpt.config.to_dict() == qvgen.load_checkpoint(folder / "transformer").config.to_dict()
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "qvgen" and saved["current_rank"] == 4
    again = WanTransformer3DModel.from_pretrained(tmp_path / "resaved")
    assert torch.equal(run_wan(again, 500.0), run_wan(model, 500.0))


def test_quantize_on_load_warns_and_round_trips(tmp_path, caplog):
    fp = tiny_wan(num_layers=1)
    fp.save_pretrained(tmp_path / "fp")
    with caplog.at_level(logging.WARNING, logger="qvgen.diffusers"):
        q = WanTransformer3DModel.from_pretrained(
            tmp_path / "fp", quantization_config=QVGenConfig(weight_bits=4, act_bits=4)
        )
    assert "QAT checkpoints" in caplog.text and "round-to-nearest" in caplog.text
    assert all(not isinstance(m, nn.Linear) for m in q.modules())
    ref, out = run_wan(fp, 400.0), run_wan(q, 400.0)
    assert 0 < (out - ref).norm() / ref.norm() < 0.5
    q.save_pretrained(tmp_path / "q")
    cfg = qvgen.load_checkpoint(tmp_path / "q").config
    assert (cfg.rank, cfg.current_rank, cfg.n_buckets) == (0, 0, 1)
    assert torch.equal(run_wan(WanTransformer3DModel.from_pretrained(tmp_path / "q"), 400.0), out)


def test_dequantize_gives_plain_linear_layers(wan_ckpt):
    folder, _ = wan_ckpt
    loaded = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    w = loaded.blocks[0].ffn.net[2].dequantize_weight()
    loaded.dequantize()
    layer = loaded.blocks[0].ffn.net[2]
    assert type(layer) is nn.Linear and torch.equal(layer.weight, w)
    assert not any(isinstance(m, PackedLinear) for m in loaded.modules())


# ---- pipelines -------------------------------------------------------------------------------------
def _frames(pipe, **kw):
    out = pipe(
        "a red circle moving right",
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    return out.frames


def test_wan_pipeline_with_quantized_transformer_and_full_repo(tmp_path, wan_ckpt):
    folder, _ = wan_ckpt
    tiny_wan_pipeline().save_pretrained(tmp_path / "base")
    transformer = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    pipe = WanPipeline.from_pretrained(tmp_path / "base", transformer=transformer)
    seen = []
    state = transformer._qvgen_timestep_state
    orig = state.set_timestep
    state.set_timestep = lambda t: (seen.append(float(t.reshape(-1)[0])), orig(t))[1]
    frames = _frames(pipe, num_frames=5, guidance_scale=1.0)
    assert frames.shape == (1, 5, 16, 16, 3) and frames.std() > 0
    assert len(seen) == 2 and seen[0] > seen[1]  # the hook saw both denoising steps' timesteps
    # A full QVGen repo: the base pipeline with transformer/ replaced by the QVGen checkpoint.
    full = tmp_path / "full"
    shutil.copytree(tmp_path / "base", full, ignore=shutil.ignore_patterns("transformer"))
    shutil.copytree(folder / "transformer", full / "transformer")
    pipe2 = DiffusionPipeline.from_pretrained(full)
    assert isinstance(pipe2.transformer.blocks[1].attn2.to_k, PackedLinear)
    assert (_frames(pipe2, num_frames=5, guidance_scale=1.0) == frames).all()


def test_pipeline_quantization_config_still_works(tmp_path):
    PipelineQuantizationConfig = getattr(diffusers.quantizers, "PipelineQuantizationConfig", None)
    if PipelineQuantizationConfig is None:
        pytest.skip("this diffusers has no PipelineQuantizationConfig")

    tiny_wan_pipeline().save_pretrained(tmp_path / "base")
    pq = PipelineQuantizationConfig(quant_mapping={"transformer": QVGenQuantizationConfig(weight_bits=4, act_bits=4)})
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "base", quantization_config=pq)
    assert isinstance(pipe.transformer.blocks[0].attn1.to_q, PackedLinear)
    assert not isinstance(pipe.text_encoder.encoder.block[0].layer[0].SelfAttention.q, PackedLinear)
    # `quant_backend=` needs the backend in transformers too; QVGen quantizes only the diffusion transformer.
    with pytest.raises(ValueError, match="quant_backend=qvgen was not found"):
        PipelineQuantizationConfig(quant_backend="qvgen", quant_kwargs={"weight_bits": 4})


def test_cogvideox_from_pretrained_and_pipeline(tmp_path):
    pipe = tiny_cogvideox_pipeline()
    pipe.save_pretrained(tmp_path / "base")
    model, cfg = packed(pipe.transformer, rank=2, n_buckets=4)
    save_quantized(model, cfg, tmp_path / "q" / "transformer", dtype=torch.float32)
    loaded = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "q", subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 3, 4, 2, 2, generator=g), torch.randn(1, 16, 32, generator=g)
    with torch.no_grad():
        for t in (50, 950):
            ts = torch.tensor([t])
            assert torch.equal(loaded(x, e, ts, return_dict=False)[0], model(x, e, ts, return_dict=False)[0])
    p = CogVideoXPipeline.from_pretrained(tmp_path / "base", transformer=loaded)
    frames = _frames(p, num_frames=9, guidance_scale=6.0, max_sequence_length=16)
    assert frames.shape == (1, 9, 16, 16, 3) and frames.std() > 0


# ---- malformed configs and files ------------------------------------------------------------------
def _edit_config(folder, **changes):
    path = folder / "transformer" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization_config"].update(changes)
    path.write_text(json.dumps(cfg))


def _edit_tensors(folder, fn):
    path = folder / "transformer" / WEIGHTS
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


LAYER = "blocks.0.attn1.to_q"


# diffusers >= 0.39 hands the checkpoint files to the quantizer, so tensor errors also name the file.
NAMES_FILE = hasattr(DiffusersQuantizer, "maybe_update_loaded_keys")


def _set(key, value_fn):
    return lambda f: _edit_tensors(f, lambda sd: sd.update({key: value_fn(sd)}))


@pytest.mark.parametrize(
    "mutate, error, pattern",
    [
        (lambda f: _edit_config(f, format_version=99), ConfigError, r"format_version.*99.*upgrade qvgen"),
        (lambda f: _edit_config(f, colour="red"), ConfigError, r"unknown field.*colour"),
        (lambda f: _edit_config(f, weight_bits=1), ConfigError, r"weight_bits.*\[2, 8\].*1"),
        (
            _set(f"{LAYER}.weight_scale", lambda sd: torch.ones(3)),
            CheckpointError,
            rf"tensor '{LAYER}.weight_scale': expected .*\(64,\).*got .*\(3,\)",
        ),
        (
            lambda f: _edit_tensors(f, lambda sd: sd.pop(f"{LAYER}.weight_zero")),
            CheckpointError,
            rf"'{LAYER}.weight_zero': expected a tensor, got nothing \(missing\)|missing .*'{LAYER}.weight_zero'",
        ),
        (
            _set(f"{LAYER}.qweight", lambda sd: sd[f"{LAYER}.qweight"].to(torch.int8)),
            CheckpointError,
            rf"tensor '{LAYER}.qweight': expected .*uint8.*got torch.int8",
        ),
        (
            _set(f"{LAYER}.act_clip", lambda sd: torch.ones(7, 2)),
            CheckpointError,
            rf"tensor '{LAYER}.act_clip': expected shape \(4, 2\).*got \(7, 2\)",
        ),
    ],
    ids=["unknown-version", "unknown-field", "bad-bits", "wrong-shape", "missing-tensor", "wrong-dtype", "buckets"],
)
def test_malformed_checkpoints_give_clear_errors(wan_ckpt, mutate, error, pattern):
    folder, _ = wan_ckpt
    mutate(folder)
    with pytest.raises(error, match=pattern) as info:
        WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    if error is CheckpointError:
        assert str(info.value).startswith(
            str(folder / "transformer" / WEIGHTS) if NAMES_FILE else "QVGen checkpoint of"
        )


def test_per_tensor_checks_without_header_validation(wan_ckpt, monkeypatch):
    """diffusers < 0.39 has no `maybe_update_loaded_keys`: the per-tensor checks still catch bad files."""
    folder, _ = wan_ckpt
    monkeypatch.setattr(QVGenQuantizer, "maybe_update_loaded_keys", lambda self, keys, files: keys)
    _edit_tensors(folder, lambda sd: sd.update({f"{LAYER}.weight_zero": torch.zeros(64, dtype=torch.float16)}))
    with pytest.raises(CheckpointError, match=rf"'{LAYER}.weight_zero': expected torch.float32 .* got torch.float16"):
        WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    _edit_tensors(folder, lambda sd: sd.pop(f"{LAYER}.weight_zero"))
    with pytest.raises(CheckpointError, match=rf"missing tensors of quantized layers: \['{LAYER}.weight_zero'\]"):
        WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")


def test_truncated_safetensors_names_the_file(wan_ckpt):
    folder, _ = wan_ckpt
    path = folder / "transformer" / WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises((OSError, CheckpointError), match=WEIGHTS):
        WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")
