"""One packed-layer pipeline: the tensor table, `quantize_linear`, and every door agreeing bit for bit.

Doors compared: diffusers' quantize-on-load vs ComfyUI's Quantize node (same weights, same settings),
and `load_quantized_model` vs diffusers' `from_pretrained` vs the ComfyUI loader (same file, bf16).
ComfyUI is replaced by the fakes of `comfy_fakes` (its loader builds the model with the pack's ops).
"""

from __future__ import annotations

import json

import pytest
import torch
from comfy_fakes import FakePatcher, import_nodes, install_fake_host
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import tiny_wan
from torch import nn

import qvgen
from qvgen import CheckpointError, PackedLinear, QVGenConfig, QVGenLinear, convert_model, pack_model, save_quantized
from qvgen.adapters.comfy.names import diffusers_to_comfy
from qvgen.packed_layer import PACKED_TENSORS, PackedLayerError, quantize_linear

import_nodes()
from qvgen_nodes import loader, quantize  # noqa: E402

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402


@pytest.mark.parametrize("transform", ["none", "hadamard", "smooth"])
def test_quantize_linear_is_what_a_training_layer_exports_at_init(transform):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    cfg = QVGenConfig(rank=0, n_buckets=1, input_transform=transform)
    want = QVGenLinear.from_linear(lin, cfg, init=True, name="blocks.0.x").export_tensors()
    got = quantize_linear(lin.weight, lin.bias, cfg, name="blocks.0.x", clip_search=True)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_round_to_nearest_without_clip_search():
    """Plain min/max: the scale spans each row's range and every weight is within half a step."""
    torch.manual_seed(0)
    w = torch.randn(32, 40)
    t = quantize_linear(w, None, QVGenConfig(rank=0, n_buckets=1, weight_bits=3), clip_search=False)
    from qvgen.kernels_import import qvgen_kernels

    q = qvgen_kernels.unpack_weight(t["qweight"], 3, 40).float()
    s, z = t["weight_scale"][:, None], t["weight_zero"][:, None]
    torch.testing.assert_close(s, (w.amax(1, keepdim=True) - w.amin(1, keepdim=True)) / 7, rtol=1e-6, atol=0)
    assert int(q.min()) == 0 and int(q.max()) == 7
    assert bool(((s * (q - z) - w).abs() <= s / 2 * (1 + 1e-5)).all())
    assert torch.equal(t["weight_qsum"], q.sum(1).to(torch.int32))
    assert [k for k in PACKED_TENSORS if k in t] == list(t)  # the table's order


def test_set_tensors_checks_names_dtypes_and_shapes():
    t = quantize_linear(torch.randn(8, 6), torch.zeros(8), QVGenConfig(rank=0, n_buckets=1))
    cfg = QVGenConfig(rank=0, n_buckets=1)
    layer = PackedLinear.from_tensors(t, cfg, 6, dtype=torch.bfloat16, name="x")
    assert layer.weight_scale.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert layer.qweight.data_ptr() == t["qweight"].data_ptr()  # taken without a copy
    for bad, pattern in (
        ({**t, "weight_scale": t["weight_scale"].half()}, "'weight_scale': expected torch.float32"),
        ({**t, "qweight": t["qweight"][:, :2]}, r"'qweight': expected shape \(8, 3\)"),
        ({**t, "extra": t["bias"]}, "unknown packed tensors"),
        ({k: v for k, v in t.items() if k != "act_clip"}, "no 'act_clip'"),
    ):
        with pytest.raises(PackedLayerError, match=pattern):
            PackedLinear.from_tensors(bad, cfg, 6, name="x")


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def test_diffusers_and_comfyui_quantize_the_same_bits(tmp_path, monkeypatch):
    install_fake_host(monkeypatch, [tmp_path / "diffusion_models"])
    fp = tiny_wan(num_layers=1)
    fp.save_pretrained(tmp_path / "fp")
    cfg = QVGenConfig(weight_bits=4, act_bits=4, rank=0, n_buckets=1)
    via_diffusers = WanTransformer3DModel.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    root = nn.Module()
    root.diffusion_model = tiny_wan(num_layers=1)
    clone, names = quantize.quantize_model(FakePatcher(root), clip_search=True)
    d = _layers(via_diffusers)
    assert sorted(names) == sorted(d) and len(d) > 10
    for name in names:
        node = clone.object_patches[f"diffusion_model.{name}"]
        for key, want in d[name].named_parameters():
            got = getattr(node, key)
            assert got.dtype == want.dtype and torch.equal(got, want), (name, key)


def test_every_loader_gives_the_same_tensors_and_dtype_rule(tmp_path, monkeypatch):
    """scales and zero points stay float32 in a bf16 model; bias and Φ follow the compute dtype."""
    calls = install_fake_host(monkeypatch, [tmp_path / "diffusion_models"])
    model = tiny_wan(num_layers=1)
    cfg = QVGenConfig(rank=4, n_buckets=4)
    convert_model(model, cfg, progress=False)
    pack_model(model, cfg)
    save_quantized(model, cfg, tmp_path / "repo" / "transformer", dtype=torch.float32)
    single = save_quantized(model, cfg, calls["dirs"][0] / "m.safetensors", dtype=torch.float32)
    bf16 = torch.bfloat16
    core = _layers(qvgen.load_quantized_model(single, dtype=bf16))
    via_diffusers = _layers(WanTransformer3DModel.from_pretrained(tmp_path / "repo/transformer", torch_dtype=bf16))
    comfy = loader.load_model(single, compute_dtype="bf16").patcher.model.diffusion_model
    assert core.keys() == via_diffusers.keys() and len(core) > 10
    keep_fp32 = WanTransformer3DModel._keep_in_fp32_modules  # diffusers' own rule for these modules
    for name, layer in core.items():
        other = comfy.get_submodule(diffusers_to_comfy(name + ".x").rpartition(".")[0])
        for key, t in layer.named_parameters():
            fixed = PACKED_TENSORS[key].dtype
            assert t.dtype == (fixed or bf16), (name, key, t.dtype)
            for door in (via_diffusers[name], other):
                got = getattr(door, key)
                if door is via_diffusers[name] and fixed is None and set(name.split(".")) & set(keep_fp32):
                    assert got.dtype == torch.float32 and torch.equal(got.to(bf16), t), (name, key)
                    continue
                assert got.dtype == t.dtype and torch.equal(got, t), (name, key)


def _relabel_bits(path, bits: int) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    q = json.loads(meta["quantization_config"])
    meta["quantization_config"] = json.dumps({**q, "weight_bits": bits})
    save_file(tensors, str(path), metadata=meta)


def test_a_file_whose_codes_exceed_its_bits_is_refused(tmp_path, monkeypatch):
    calls = install_fake_host(monkeypatch, [tmp_path / "diffusion_models"])
    model = tiny_wan(num_layers=1)
    cfg = QVGenConfig(rank=0, n_buckets=1)
    convert_model(model, cfg, progress=False)
    path = save_quantized(model, cfg, calls["dirs"][0] / "m.safetensors", dtype=torch.float32)
    _relabel_bits(path, 3)  # 4-bit codes, labelled W3
    pattern = r"weight codes up to 1[0-5] but weight_bits=3 allows at most 7"
    with pytest.raises(CheckpointError, match=pattern):
        qvgen.load_checkpoint(path)
    with pytest.raises(loader.QVGenLoadError, match=pattern):
        loader.load_model(path)


def test_cpu_path_unpacks_weights_once_and_follows_changes(monkeypatch):
    from qvgen.kernels_import import qvgen_kernels

    torch.manual_seed(0)
    cfg = QVGenConfig(rank=0, n_buckets=1)
    layer = PackedLinear.from_tensors(quantize_linear(torch.randn(24, 40), None, cfg), cfg, 40)
    layer.backend = "cpu"
    x = torch.randn(3, 40)
    want = qvgen_kernels.quantized_linear(
        x, layer.qweight, layer.weight_scale, layer.weight_zero, layer.weight_qsum, None,
        in_features=40, w_bits=4, a_bits=4, clip_lo=layer.act_clip[0, 0].item(), clip_hi=layer.act_clip[0, 1].item(),
        backend="cpu",
    )  # fmt: skip
    calls = []
    unpack = qvgen_kernels.unpack_weight
    monkeypatch.setattr(qvgen_kernels, "unpack_weight", lambda *a: calls.append(1) or unpack(*a))
    y1, y2 = layer(x), layer(x)
    assert len(calls) == 1 and torch.equal(y1, want) and torch.equal(y2, want)
    assert layer.cached_codes_bytes() == 24 * 40 and "_codes" not in layer.state_dict()
    other = quantize_linear(torch.randn(24, 40), None, cfg)
    layer.set_tensors(other)  # a new qweight (a reload, a device move): the cache follows
    assert not torch.equal(layer(x), y1) and len(calls) == 2
    with torch.inference_mode():  # how ComfyUI loads and runs: inference tensors have no version counter
        frozen = PackedLinear.from_tensors(quantize_linear(torch.randn(24, 40), None, cfg), cfg, 40)
        frozen.backend = "cpu"
        assert frozen.qweight.is_inference() and torch.equal(frozen(x), frozen(x))


def test_bench_comfy_reports_the_ratio(tmp_path):
    from qvgen.bench.__main__ import main

    out = tmp_path / "r.json"
    argv = ["comfy", "--dim", "128", "--ffn", "256", "--layers", "1", "--text-dim", "64", "--frames", "1"]
    assert main([*argv, "--size", "32", "--warmup", "0", "--repeats", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["ratio"] == r["w4a4_ms"] / r["fp32_ms"] and r["packed_mib"] < r["linear_weights_fp32_mib"]
    assert r["cpu_code_cache_mib"] > 0  # the CPU path cached its unpacked codes
