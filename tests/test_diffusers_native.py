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


DISK_MAP = {
    **dict.fromkeys(["rope", "patch_embedding", "condition_embedder", "scale_shift_table", "blocks.0"], "cpu"),
    **{"blocks.1": "disk", "norm_out": "cpu", "proj_out": "cpu"},
}


def test_disk_offload_in_bf16_keeps_the_formats_dtypes(export, tmp_path):
    """diffusers casts what it offloads to disk to `torch_dtype`; the quantizer re-reads the fixed-dtype
    tensors (fp8 and float32 scales) exactly: every offloaded tensor equals the in-memory load's, dtype
    included. The outputs then differ at most by the bf16 GEMM's summation order (the two copies may sit
    at differently aligned addresses): max |Δ| ≤ 2e-2 · max |y|, as for bf16 in test_comfy_native_schemes.py."""
    _, _, folder = export
    ref = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).get_submodule("blocks.1.attn1.to_q")
    model = WanTransformer3DModel.from_pretrained(
        folder, torch_dtype=torch.bfloat16, device_map=DISK_MAP, offload_folder=tmp_path / "offload"
    )
    layer = model.get_submodule("blocks.1.attn1.to_q")
    for name, p in ref.named_parameters():
        offloaded = layer._hf_hook.weights_map[name]
        assert offloaded.dtype == p.dtype and torch.equal(offloaded, p), name
    x = torch.randn(1, 6, layer.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        y, want = layer(x).float(), ref(x).float()
    assert float((y - want).abs().max()) <= 2e-2 * float(want.abs().max())


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
    card = (staged / "README.md").read_text()  # the card shows the diffusers route to the folder it ships
    assert "## Use with diffusers" in card and 'from_pretrained(\n    "org/x", subfolder="transformer"' in card


# ---- comfy-kitchen's kernels behind one seam (qvgen.adapters.comfy.kitchen) -------------------------------
def test_loaded_layers_keep_our_compute_on_the_cpu(export, monkeypatch):
    """Both loaders route the native layers through the seam; on the CPU it keeps the layer's own forward."""
    from qvgen.adapters.comfy import kitchen

    scheme, file, folder = export
    monkeypatch.setattr(kitchen, "kitchen_linear", lambda *a, **k: pytest.fail("routed to comfy-kitchen on the CPU"))
    for model in (load_quantized_model(file), WanTransformer3DModel.from_pretrained(folder)):
        layers = quantized(model, scheme)
        assert layers and all(isinstance(m, kitchen.KitchenRoute) for m in layers.values())
        layer = layers[LAYER]
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
        assert kitchen.gpu_backend(x.device, layer) is None
        with torch.no_grad():
            assert torch.equal(layer(x), super(kitchen.KitchenRoute, layer).forward(x))
        run(model)


def _backends(monkeypatch, *available):
    ck = pytest.importorskip("comfy_kitchen")
    monkeypatch.setattr(ck.registry, "is_available", lambda name: name in available)


def test_gpu_backend_is_the_available_kitchen_backend_for_gpu_inputs(monkeypatch):
    """Which backend the seam picks, from what comfy-kitchen reports (faked: this machine has no GPU)."""
    from qvgen.adapters.comfy.kitchen import gpu_backend
    from qvgen.schemes.convrot import ConvRotLinear
    from qvgen.schemes.nvfp4 import NVFP4Linear

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    fp4, a8 = NVFP4Linear(32, 16, True, device="meta"), ConvRotLinear(256, 16, True, act_bits=8, device="meta")
    _backends(monkeypatch, "eager")
    assert gpu_backend(gpu, fp4) is None  # eager only: our compute (the same values)
    _backends(monkeypatch, "eager", "triton", "cuda")
    assert gpu_backend(gpu, fp4) == "cuda" and gpu_backend(gpu, a8) == "cuda" and gpu_backend(cpu, fp4) is None
    _backends(monkeypatch, "eager", "triton")
    assert gpu_backend(gpu, fp4) == "triton"
    assert gpu_backend(gpu, a8) is None  # int8 tokens: only the cuda backend honours linear_dtype "int8"


def test_routed_layers_equal_comfy_kitchens_eager_op(export, monkeypatch):
    """With a backend reported, every native layer runs comfy-kitchen's op (here its eager backend, forced
    through the seam): the layout tensor the seam builds from the layer's own tensors, `F.linear` on it.
    Same codes and scales on both sides; only the float GEMM's summation order differs, so max |Δ| ≤
    1e-5 · max |y| per layer (as tests/test_comfy_native_schemes.py), and the whole model
    `assert_matches_fake_quant`. NVFP4 runs here as ComfyUI's W4A16 path (comfy-kitchen's eager FP4 GEMM
    needs torch's swizzled-scale `scaled_mm`, which the CPU lacks); its FP4 operands are compared exactly."""
    from qvgen.adapters.comfy import kitchen

    scheme, file, _ = export
    model = load_quantized_model(file)
    ref = run(model)
    calls = []
    routed = kitchen.kitchen_linear
    monkeypatch.setattr(kitchen, "gpu_backend", lambda device, layer: "eager")
    monkeypatch.setattr(kitchen, "kitchen_linear", lambda *a, **k: calls.append(a[0]) or routed(*a, **k))
    layers = quantized(model, scheme)
    if scheme == "nvfp4":
        _nvfp4_operands_are_comfy_kitchens(layers[LAYER])
        for m in layers.values():
            m.quantize_input = False
        with monkeypatch.context() as m:
            m.setattr(kitchen, "gpu_backend", lambda device, layer: None)
            ref = run(model)
    for i, (name, layer) in enumerate(layers.items()):
        x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            ours, theirs = super(kitchen.KitchenRoute, layer).forward(x), layer(x)
        err = float((ours - theirs).abs().max())
        assert err <= 1e-5 * float(theirs.abs().max()), f"{name}: max |Δ| = {err:.3g}"
    calls.clear()
    assert_matches_fake_quant(run(model), ref)
    assert len(calls) == len(layers)  # one comfy-kitchen call per quantized layer in the forward


def _nvfp4_operands_are_comfy_kitchens(layer):
    from comfy_kitchen.tensor import QuantizedTensor

    from qvgen.adapters.comfy import kitchen
    from qvgen.schemes.nvfp4 import fake_quant

    x = 3 * torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(1))
    with kitchen.kitchen().registry.use_backend("eager"):
        w = kitchen.weight_tensor(layer, torch.float32).dequantize()[: layer.out_features]
        xq = QuantizedTensor.from_float(x, kitchen.NVFP4_LAYOUT, scale=layer.input_scale).dequantize()
    assert torch.equal(w, layer.dequantize_weight()) and torch.equal(xq, fake_quant(x, layer.input_scale))


def test_load_quantized_model_reads_the_folder_too(export):
    scheme, file, folder = export
    assert_same_model(load_quantized_model(folder), load_quantized_model(file), scheme)


def test_routed_nvfp4_layer_with_padded_rows(monkeypatch):
    """NVFP4 stores rows padded to 16 and the bias unpadded: the seam cuts comfy-kitchen's output first."""
    from qvgen.adapters.comfy import kitchen
    from qvgen.schemes import nvfp4

    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(20, 32, generator=g), torch.randn(20, generator=g)
    layer = nvfp4.NVFP4Linear(32, 20, True, quantize_input=False)
    layer.load_state_dict({**nvfp4.quantize_weight(w), "bias": b, "input_scale": torch.tensor(1.0)})
    assert layer.weight.shape[0] == 32 and kitchen.use_comfy_kitchen(torch.nn.Sequential(layer)) == 1
    x = torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        ours = layer(x)
        monkeypatch.setattr(kitchen, "gpu_backend", lambda device, layer: "eager")
        theirs = layer(x)
    assert theirs.shape == (2, 5, 20)
    assert float((ours - theirs).abs().max()) <= 1e-5 * float(theirs.abs().max())  # summation order only
