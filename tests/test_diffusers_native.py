"""The diffusers door for the schemes shipped in ComfyUI's native format (`convrot_w4a4`, `nvfp4`,
`svdquant_w4a4`, `w4a8_int8`): their diffusers folder through `from_pretrained` / `save_pretrained`,
ComfyUI's single file through `from_single_file`, and the errors of malformed folders.

Every load is compared with `qvgen.load_quantized_model` of the ComfyUI file exported from the same
model, in float32: the same layer classes holding identical tensors (checked exactly, dtype included),
then one forward each. The forwards run the same operations on the same values, but diffusers leaves
its tensors where safetensors mapped them (not 64-byte aligned) and an unaligned float GEMM may sum
in another order, which can flip a 4-bit rounding downstream; so outputs are compared with
`assert_matches_fake_quant` (median |Δ| ≤ 1e-5, relative L2 ≤ 2e-3; a wrong scale gives > 1e-1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import assert_matches_fake_quant, tiny_wan, wan_inputs

import qvgen
from qvgen import CheckpointError, QVGenConfig, QVGenLinear, convert_model, load_quantized_model, save_quantized
from qvgen.schemes import get_scheme

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
from diffusers import WanTransformer3DModel  # noqa: E402

from qvgen.diffusers_backend import QVGenQuantizationConfig  # noqa: E402

CONFIGS = {
    "convrot_w4a4": dict(scheme="convrot_w4a4", rank=0, n_buckets=1),
    "nvfp4": dict(scheme="nvfp4", rank=0, n_buckets=1),
    "svdquant_w4a4": dict(scheme="svdquant_w4a4", input_transform="smooth", rank=4, final_rank=4, n_buckets=1),
    "w4a8_int8": dict(scheme="w4a8_int8", act_bits=8, rank=0, n_buckets=1),
}
WEIGHTS = "diffusion_pytorch_model.safetensors"
LAYER = "blocks.0.attn1.to_q"  # quantized in every scheme (K = 256)


def _trained(scheme: str) -> tuple[torch.nn.Module, QVGenConfig]:
    """A tiny Wan (hidden 256: every block layer fits every format) converted to `scheme`, its scales
    moved off their initial values as training would, inputs calibrated by one forward (NVFP4)."""
    model = tiny_wan(num_attention_heads=2, attention_head_dim=128, ffn_dim=512)
    cfg = QVGenConfig(**CONFIGS[scheme])
    convert_model(model, cfg, progress=False)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QVGenLinear):
                for p in m.weight_quantizer.parameters():
                    p.mul_(0.9 + 0.1 * torch.rand(p.shape, generator=g))
        x, t, e = wan_inputs(batch=1)
        model(x, t, e)
    return model, cfg


@pytest.fixture(scope="module", params=list(CONFIGS))
def export(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(scheme, ComfyUI file, diffusers folder) of one model, both in float32."""
    scheme = request.param
    model, cfg = _trained(scheme)
    root = tmp_path_factory.mktemp(scheme)
    file = save_quantized(model, cfg, root / "comfyui" / "model.safetensors", dtype=torch.float32)
    folder = save_quantized(model, cfg, root / "transformer", dtype=torch.float32)
    return scheme, file, folder


def run(model, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x, t, e = wan_inputs(batch=1)
    with torch.no_grad():
        return model(x.to(dtype), t, e.to(dtype), return_dict=False)[0].float()


def quantized(model, scheme: str) -> dict[str, torch.nn.Module]:
    types = get_scheme(scheme).inference_types
    return {n: m for n, m in model.named_modules() if isinstance(m, types)}


def assert_same_model(loaded, ref, scheme: str) -> None:
    """Same quantized layers (classes and names), identical tensors and dtypes, matching outputs."""
    assert (
        {n: type(m) for n, m in quantized(loaded, scheme).items()}
        == {n: type(m) for n, m in quantized(ref, scheme).items()}
        != {}
    )
    a, b = loaded.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert_matches_fake_quant(run(loaded), run(ref))


# ---- from_pretrained / save_pretrained -------------------------------------------------------------
def test_folder_holds_the_comfy_files_tensors_under_diffusers_names(export):
    scheme, file, folder = export
    comfy = qvgen.adapters.comfy.native.read_comfy_native(file)
    ours = load_file(str(folder / WEIGHTS))
    from qvgen.adapters.comfy.names import to_diffusers_state_dict

    want = to_diffusers_state_dict(comfy.state_dict)
    assert ours.keys() == want.keys()
    for k, t in want.items():
        assert ours[k].dtype == t.dtype and torch.equal(ours[k], t), k
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["_class_name"] == "WanTransformer3DModel"
    assert cfg["quantization_config"] == comfy.config.to_dict()


def test_from_pretrained_equals_load_quantized_model(export):
    scheme, file, folder = export
    loaded = WanTransformer3DModel.from_pretrained(folder)
    assert all(not p.is_meta for p in loaded.parameters())
    assert_same_model(loaded, load_quantized_model(file), scheme)


def test_save_pretrained_round_trips_tensor_for_tensor(export, tmp_path):
    scheme, file, folder = export
    loaded = WanTransformer3DModel.from_pretrained(folder)
    loaded.save_pretrained(tmp_path / "again")
    before, after = load_file(str(folder / WEIGHTS)), load_file(str(tmp_path / "again" / WEIGHTS))
    assert before.keys() == after.keys()
    for k, t in before.items():
        assert after[k].dtype == t.dtype and torch.equal(after[k], t), k
    saved = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert saved == json.loads((folder / "config.json").read_text())["quantization_config"]
    assert_same_model(WanTransformer3DModel.from_pretrained(tmp_path / "again"), loaded, scheme)


def test_bf16_load_keeps_the_formats_own_dtypes(export, tmp_path):
    """`torch_dtype=torch.bfloat16`: codes, fp8 and float32 scales stay as stored (the layer's `keep_dtype`),
    everything else follows bf16 (float32 inside diffusers' `_keep_in_fp32_modules`), and the model runs."""
    scheme, _, folder = export
    stored = load_file(str(folder / WEIGHTS))
    loaded = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    layer = loaded.get_submodule(LAYER)
    for name, p in layer.named_parameters():
        raw = stored[f"{LAYER}.{name}"]
        fixed = not raw.is_floating_point() or raw.element_size() == 1 or name in getattr(layer, "keep_dtype", ())
        assert p.dtype == (raw.dtype if fixed else torch.bfloat16), name
        assert torch.equal(p.to(raw.dtype), raw) if fixed else torch.equal(p, raw.to(torch.bfloat16)), name
    assert torch.isfinite(run(loaded, torch.bfloat16)).all()


def test_device_map_cpu_loads_the_same_model(export):
    scheme, file, folder = export
    loaded = WanTransformer3DModel.from_pretrained(folder, device_map="cpu")
    assert set(map(str, loaded.hf_device_map.values())) == {"cpu"}
    assert_same_model(loaded, load_quantized_model(file), scheme)


def test_dequantize_gives_plain_linear_layers(export):
    scheme, file, folder = export
    loaded = WanTransformer3DModel.from_pretrained(folder)
    ref = loaded.get_submodule(LAYER).dequantize_weight(torch.float32)
    loaded.dequantize()
    layer = loaded.get_submodule(LAYER)
    assert type(layer) is torch.nn.Linear and torch.equal(layer.weight, ref)
    assert not quantized(loaded, scheme)


# ---- from_single_file -------------------------------------------------------------------------------
def test_from_single_file_reads_the_comfyui_file(export):
    """diffusers' single-file loader with the file's own config: its Wan mapping renames ComfyUI's keys,
    the quantizer checks and drops the `comfy_quant` entries; `config=` names the model config (offline)."""
    scheme, file, folder = export
    qc = QVGenQuantizationConfig.from_single_file(file)
    assert qc.scheme == scheme
    loaded = WanTransformer3DModel.from_single_file(str(file), config=str(folder), quantization_config=qc)
    assert_same_model(loaded, load_quantized_model(file), scheme)


def test_from_single_file_with_another_schemes_config_names_the_layer(export):
    scheme, file, folder = export
    other = "nvfp4" if scheme != "nvfp4" else "convrot_w4a4"
    qc = QVGenQuantizationConfig.from_dict(CONFIGS[other])
    with pytest.raises(CheckpointError, match=r"tensor '.*\.comfy_quant': layer format .* but quantization_config"):
        WanTransformer3DModel.from_single_file(str(file), config=str(folder), quantization_config=qc)


def test_single_file_config_needs_qvgen_metadata(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match=r"plain.safetensors: no 'quantization_config'.*load_comfy_native"):
        QVGenQuantizationConfig.from_single_file(tmp_path / "plain.safetensors")


# ---- malformed folders -------------------------------------------------------------------------------
def _copy_with(folder: Path, dest: Path, edit) -> Path:
    dest.mkdir()
    (dest / "config.json").write_text((folder / "config.json").read_text())
    sd = load_file(str(folder / WEIGHTS))
    edit(sd)
    save_file(sd, str(dest / WEIGHTS), metadata={"format": "pt"})
    return dest


def test_missing_tensor_is_named(export, tmp_path):
    _, _, folder = export
    bad = _copy_with(folder, tmp_path / "bad", lambda sd: sd.pop(f"{LAYER}.weight"))
    with pytest.raises(CheckpointError, match=rf"missing tensors of quantized layers: \['{LAYER}.weight'\]"):
        WanTransformer3DModel.from_pretrained(bad)


def test_wrong_shape_is_named(export, tmp_path):
    _, _, folder = export
    key = f"{LAYER}.weight"
    bad = _copy_with(folder, tmp_path / "bad", lambda sd: sd.update({key: sd[key][:, :-1].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}': expected shape \(\d+, \d+\).*got \(\d+, \d+\)"):
        WanTransformer3DModel.from_pretrained(bad)


def test_unknown_tensor_of_a_quantized_layer_is_named(export, tmp_path):
    _, _, folder = export
    key = f"{LAYER}.weight_correction"
    bad = _copy_with(folder, tmp_path / "bad", lambda sd: sd.update({key: torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' is not part of the quantized layer '{LAYER}'"):
        WanTransformer3DModel.from_pretrained(bad)


def test_wrong_dtype_is_named(tmp_path):
    model, cfg = _trained("nvfp4")
    folder = save_quantized(model, cfg, tmp_path / "transformer", dtype=torch.float32)
    key = f"{LAYER}.weight_scale"
    bad = _copy_with(folder, tmp_path / "bad", lambda sd: sd.update({key: sd[key].float()}))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}': expected torch.float8_e4m3fn .* got torch.float32"):
        WanTransformer3DModel.from_pretrained(bad)


def test_native_scheme_cannot_quantize_on_load(tmp_path):
    tiny_wan(num_attention_heads=2, attention_head_dim=128, ffn_dim=512).save_pretrained(tmp_path / "fp")
    qc = QVGenQuantizationConfig.from_dict(CONFIGS["nvfp4"])
    with pytest.raises(ValueError, match=r"scheme 'nvfp4' cannot quantize a full-precision model on load"):
        WanTransformer3DModel.from_pretrained(tmp_path / "fp", quantization_config=qc)


def test_save_quantized_path_picks_file_or_folder(tmp_path):
    model, cfg = _trained("w4a8_int8")
    with pytest.raises(CheckpointError, match=r"single file to a path ending in .safetensors"):
        save_quantized(model, cfg, tmp_path / "x", single_file=True)
    with pytest.raises(CheckpointError, match=r"diffusers folder to any other path"):
        save_quantized(model, cfg, tmp_path / "x.safetensors", single_file=False)


# ---- python -m qvgen.train and the Hub ------------------------------------------------------------------
@pytest.mark.slow
def test_train_leaves_the_diffusers_folder_next_to_the_comfyui_file(tmp_path, monkeypatch):
    """`python -m qvgen.train --scheme w4a8_int8`: OUTPUT/comfyui/<file> as before, OUTPUT/transformer holding
    the same tensors, which `WanPipeline.from_pretrained(base, transformer=...)` runs; `qvgen.hub push`
    stages both."""
    from diffusers import WanPipeline
    from tiny_models import tiny_wan_pipeline, write_clips

    from qvgen.hub import main as hub_main
    from qvgen.train.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = tiny_wan_pipeline()
    pipe.transformer = tiny_wan(num_attention_heads=2, attention_head_dim=128, ffn_dim=512)
    pipe.save_pretrained(tmp_path / "pipe")
    write_clips(tmp_path / "data", n=2, layout="jsonl")
    out = tmp_path / "run"
    args = ["--model", str(tmp_path / "pipe"), "--data", str(tmp_path / "data"), "--output", str(out)]
    args += ["--num-frames", "5", "--height", "32", "--width", "32", "--max-text-len", "8", "--steps", "2"]
    args += ["--rank", "0", "--act-bits", "8", "--no-progress", "--scheme", "w4a8_int8"]
    assert main(args) == 0
    file = out / "comfyui" / "diffusion_model_w4a8_int8.safetensors"
    transformer = WanTransformer3DModel.from_pretrained(out / "transformer", torch_dtype=torch.float32)
    assert_same_model(transformer, load_quantized_model(file), "w4a8_int8")  # bf16 export, both upcast
    pipe = WanPipeline.from_pretrained(tmp_path / "pipe", transformer=transformer)
    frames = pipe("a red circle", num_inference_steps=2, height=16, width=16, num_frames=5, output_type="pt").frames
    assert frames.shape[1] == 5 and torch.isfinite(frames).all()
    (tmp_path / "pipe" / "LICENSE").write_text("Apache License 2.0 (test copy)\n")
    staged = tmp_path / "staged"
    assert hub_main(["push", str(out), "org/x", "--base-model", str(tmp_path / "pipe"), "--dry-run", str(staged)]) == 0
    files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    assert files == [
        "LICENSE",
        "README.md",
        "comfyui/x.safetensors",
        "transformer/config.json",
        f"transformer/{WEIGHTS}",
    ]
