"""The ComfyUI node pack's logic, without ComfyUI: every ComfyUI call goes through `qvgen_nodes.host`,
which these tests replace with fakes (a tiny operations class, loader and patcher)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from comfy_fakes import REPO, Bar, FakeOps, FakePatcher, import_nodes, install_fake_host
from torch import nn

import_nodes()
from qvgen import QVGenConfig  # noqa: E402
from qvgen.adapters.comfy.names import comfy_to_diffusers, detect_naming, diffusers_to_comfy, to_comfy_state_dict  # noqa: E402
from qvgen.layers import QVGenLinear  # noqa: E402
from qvgen.quantizers import fake_quant_act, fake_quant_weight  # noqa: E402
from qvgen_nodes import download, loader, ops, quantize, schema  # noqa: E402


@pytest.fixture
def fake_host(monkeypatch, tmp_path):
    return install_fake_host(monkeypatch, [tmp_path / "unet", tmp_path / "diffusion_models"])


def _tiny_comfy_checkpoint(path: Path, n_buckets: int = 4, rank: int = 0) -> Path:
    """A tiny diffusers Wan, QVGen-converted and saved as one file (diffusers names, as exported)."""
    from tiny_models import tiny_wan

    from qvgen import convert_model, save_quantized

    model = tiny_wan()
    convert_model(model, QVGenConfig(n_buckets=n_buckets, rank=rank), init=False, progress=False)
    return save_quantized(model, QVGenConfig(n_buckets=n_buckets, rank=rank), path, dtype=torch.float32)


def _packed_layer(in_f=48, out_f=40, bias=True, n_buckets=3, rank=0, transform="none", seed=0):
    """A trained-form layer and the ops Linear holding its exported tensors."""
    torch.manual_seed(seed)
    cfg = QVGenConfig(n_buckets=n_buckets, rank=rank, input_transform=transform)
    ref = QVGenLinear.from_linear(nn.Linear(in_f, out_f, bias=bias), cfg, name="layer")
    with torch.no_grad():
        ref.act_quantizer.clip_logits.copy_(torch.linspace(0.5, 3.0, n_buckets)[:, None].repeat(1, 2))
        if ref.smooth_log is not None:  # scales other than 1, so the smoothing case is really exercised
            ref.smooth_log.copy_(torch.linspace(-1.0, 1.0, in_f))
            ref.init_quantization()
    state = {"layer." + k: v for k, v in ref.export_tensors().items()}
    state["layer.weight"] = torch.empty(out_f, in_f, device="meta")
    settings = ops.OpsSettings(config=cfg)
    holder = nn.Module()
    holder.layer = ops.make_ops(FakeOps, settings).Linear(in_f, out_f, bias=bias, dtype=torch.float32)
    holder.load_state_dict(state, strict=False)
    return ref, holder.layer, settings


# ---- entry point -----------------------------------------------------------------------------
def test_root_entry_point_imports_without_comfyui_triton_or_torch():
    code = (
        "import importlib.util, sys;"
        f"spec = importlib.util.spec_from_file_location('qvgen_pack', {str(REPO / '__init__.py')!r},"
        f" submodule_search_locations=[{str(REPO)!r}]);"
        "m = importlib.util.module_from_spec(spec); sys.modules['qvgen_pack'] = m; spec.loader.exec_module(m);"
        "print(hasattr(m, 'comfy_entrypoint'), 'triton' in sys.modules, 'torch' in sys.modules,"
        " 'comfy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "False", "False"], out


def test_node_modules_fail_one_at_a_time(monkeypatch, caplog):
    nodes_pkg = sys.modules["qvgen_nodes"]
    assert nodes_pkg.load_nodes() == []  # no ComfyUI here: each node module fails alone, logged
    assert sum("could not be loaded" in r.message for r in caplog.records) == len(nodes_pkg.NODE_MODULES)
    assert not nodes_pkg.has_v3_api() and not nodes_pkg.in_comfyui()
    # one module that imports and one that does not: the first one's nodes still load
    caplog.clear()
    good = type(sys)("qvgen_nodes.node_good")
    good.NODES = [type("GoodNode", (), {})]
    monkeypatch.setitem(sys.modules, "qvgen_nodes.node_good", good)
    monkeypatch.setitem(sys.modules, "qvgen_nodes.node_broken", None)  # import raises ImportError
    monkeypatch.setattr(nodes_pkg, "NODE_MODULES", ("node_broken", "node_good"))
    assert nodes_pkg.load_nodes() == good.NODES
    failed = [r.message for r in caplog.records if "could not be loaded" in r.message]
    assert len(failed) == 1 and "node_broken" in failed[0]


def test_node_specs_are_documented():
    for spec in schema.NODE_SPECS.values():
        assert spec.category == "QVGen" and len(spec.description) > 80 and spec.display_name
        assert all(i.tooltip for i in spec.inputs) and all(o.tooltip for o in spec.outputs)
        for i in spec.inputs:
            if i.type == "COMBO" and not callable(i.options):
                assert i.default in i.option_list()
    assert [i.name for i in schema.LOADER.inputs if not i.optional] == ["checkpoint"]


# ---- names -----------------------------------------------------------------------------------
def test_wan_names_both_ways(wan_model):
    sd = wan_model.state_dict()
    comfy = to_comfy_state_dict(sd)
    for key in (
        "blocks.0.self_attn.q.weight",
        "blocks.1.cross_attn.o.bias",
        "blocks.0.ffn.0.weight",
        "blocks.0.ffn.2.weight",
        "blocks.0.norm3.weight",  # diffusers' norm2 (the affine cross-attention norm)
        "blocks.0.modulation",
        "head.head.weight",
        "head.modulation",
        "text_embedding.0.weight",
        "time_embedding.2.bias",
        "time_projection.1.weight",
        "patch_embedding.weight",
    ):
        assert key in comfy, key
    assert {comfy_to_diffusers(k) for k in comfy} == set(sd)
    assert detect_naming(sd) == "diffusers" and detect_naming(comfy) == "comfyui"
    assert to_comfy_state_dict(comfy).keys() == comfy.keys()
    assert diffusers_to_comfy("blocks.3.attn1.to_out.0.qweight") == "blocks.3.self_attn.o.qweight"
    assert diffusers_to_comfy("condition_embedder.image_embedder.ff.net.0.proj.act_clip") == "img_emb.proj.1.act_clip"
    with pytest.raises(ValueError):
        detect_naming(["foo.bar"])


# ---- the operations class ---------------------------------------------------------------------
@pytest.mark.parametrize("transform,rank", [("none", 0), ("hadamard", 4), ("smooth", 0)])
def test_ops_linear_computes_what_packed_linear_does(transform, rank):
    from qvgen.surgery import pack_model

    ref, layer, settings = _packed_layer(rank=rank, transform=transform)
    holder = nn.Module()
    holder.layer = ref
    packed = pack_model(holder, QVGenConfig(n_buckets=3, rank=rank, input_transform=transform)).layer
    assert layer.quantized and settings.layers == [layer] and layer.weight.numel() == 0
    x = torch.randn(2, 5, 48)
    for bucket in (0, 2):
        layer.timestep_state = packed.timestep_state = type("S", (), {"bucket": bucket})()
        torch.testing.assert_close(layer(x), packed(x), rtol=0, atol=1e-6)
    assert "W4A4" in repr(layer)


def test_ops_linear_loads_full_precision_layers_as_plain_linears():
    settings = ops.OpsSettings(config=QVGenConfig())
    layer = ops.make_ops(FakeOps, settings).Linear(6, 4)
    holder = nn.Module()
    holder.layer = layer
    w, b = torch.randn(4, 6), torch.randn(4)
    holder.load_state_dict({"layer.weight": w, "layer.bias": b})
    x = torch.randn(3, 6)
    assert not layer.quantized and settings.layers == []
    torch.testing.assert_close(layer(x), F.linear(x, w, b))


def test_ops_linear_rejects_tensors_of_the_wrong_layer():
    _, layer, _ = _packed_layer()
    holder = nn.Module()
    holder.layer = ops.make_ops(FakeOps, ops.OpsSettings(config=QVGenConfig(n_buckets=3))).Linear(64, 40)
    with pytest.raises(RuntimeError, match=r"'qweight': expected shape \(40, 32\) .* got \(40, 24\)"):
        holder.load_state_dict({f"layer.{k}": v for k, v in layer.state_dict().items()}, strict=False)


def test_lora_patch_hooks_store_a_low_rank_delta_and_undo():
    _, layer, _ = _packed_layer(in_f=64, out_f=96)
    x = torch.randn(3, 64)
    base = layer(x)
    w_hat = layer.convert_weight(layer.weight.float())  # what ComfyUI's patcher starts from
    assert w_hat.shape == (96, 64)
    up, down = torch.randn(96, 4) * 0.1, torch.randn(4, 64) * 0.1
    placeholder = layer.weight
    layer.set_weight(w_hat + up @ down)  # ComfyUI: calculate_weight(...) then set_func(...)
    assert layer.weight.shape == (4, 96 + 64)  # rank-4 factors, not a dense copy
    torch.testing.assert_close(layer(x), base + x @ (up @ down).T, rtol=1e-4, atol=1e-5)
    # a second patch pass starts from dequantized weight + the stored delta
    torch.testing.assert_close(layer.convert_weight(layer.weight.float()), w_hat + up @ down, rtol=1e-4, atol=1e-5)
    layer.weight = placeholder  # ComfyUI's unpatch restores the backed-up `weight`
    torch.testing.assert_close(layer(x), base)
    dense = layer.set_weight(w_hat + torch.randn(96, 64), return_weight=True)
    assert dense.shape == (96, 64)  # not low-rank: kept dense
    assert layer.set_weight(w_hat, return_weight=True).numel() == 0


def test_lowvram_patch_functions_apply_and_are_cached():
    _, layer, _ = _packed_layer(in_f=64, out_f=96)
    x = torch.randn(3, 64)
    base = layer(x)
    up, down = torch.randn(96, 2) * 0.1, torch.randn(2, 64) * 0.1
    calls = []

    class LowVramPatch:  # the shape of ComfyUI's: patches dict + key, called with the cast weight
        def __init__(self):
            self.key, self.patches = "layer.weight", {"layer.weight": [("lora",)]}

        def __call__(self, weight):
            calls.append(1)
            return layer.set_weight(layer.convert_weight(weight.float()) + up @ down, return_weight=True)

    layer.weight_function = [LowVramPatch()]
    y1, y2 = layer(x), layer(x)
    assert len(calls) == 1 and torch.equal(y1, y2)
    torch.testing.assert_close(y1, base + x @ (up @ down).T, rtol=1e-4, atol=1e-5)
    layer.bias_function = [lambda b: b + 1.0]  # patched bias, via a temporary copy of the tensors
    torch.testing.assert_close(layer(x), y1 + 1.0)
    assert layer.bias is not None and not torch.equal(layer.bias, layer.bias + 1)


# ---- the loader ------------------------------------------------------------------------------
def test_comfy_state_dict_adds_shape_only_placeholders(tmp_path):
    from qvgen import load_checkpoint

    ckpt = load_checkpoint(_tiny_comfy_checkpoint(tmp_path / "m.safetensors"))
    sd, layers = loader.comfy_state_dict(ckpt.state_dict, 4)
    assert "blocks.0.self_attn.q" in layers and "head.head" in layers
    w = sd["head.head.weight"]
    assert w.device.type == "meta" and w.shape == (4 * 4, 64) and w.dtype == torch.float32
    assert sd["blocks.0.ffn.0.weight"].shape == (128, 64)


def test_load_model_builds_through_comfyui_loader(fake_host, tmp_path):
    path = _tiny_comfy_checkpoint(fake_host["dirs"][1] / "tiny.safetensors")
    loaded = loader.load_model(path, compute_dtype="bf16")
    opts = fake_host["options"]
    assert opts["dtype"] == torch.bfloat16 and hasattr(opts["custom_operations"], "qvgen_settings")
    dm = loaded.patcher.model.diffusion_model
    assert not [k for k in fake_host["unexpected"] if k.rpartition(".")[0] in dm.names]  # packed tensors all taken
    assert loaded.layers == len(ops.quantized_layers(dm)) > 10
    state = opts["custom_operations"].qvgen_settings.timestep_state
    first = dm.get_submodule(dm.names[0])
    x = torch.randn(2, first.in_features)
    dm(x, torch.tensor([990.0, 990.0]))
    assert state.bucket == 3  # 4 buckets: floor(990 / 1000 * 4)
    dm(x, timestep=torch.tensor([10.0, 600.0]))
    assert state.bucket.tolist() == [0, 2]
    assert "W4A4" in loaded.info


def test_load_model_errors_are_clear(fake_host, tmp_path):
    bad = tmp_path / "not_qvgen.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(bad))
    with pytest.raises(loader.QVGenLoadError, match="not a QVGen checkpoint"):
        loader.load_model(bad)
    with pytest.raises(loader.QVGenLoadError, match="backend"):
        loader.load_model(bad, backend="cuda")
    with pytest.raises(loader.QVGenLoadError, match="triton"):
        os.environ.pop("TRITON_INTERPRET", None)
        loader.load_model(bad, backend="triton")


def test_timestep_from_comfyui_arguments():
    t = loader.comfy_timestep((None, torch.tensor([500.0, 500.0])), {})
    assert t.tolist() == [500.0]
    assert loader.comfy_timestep((None, torch.tensor([1.0, 2.0])), {}).tolist() == [1.0, 2.0]
    assert loader.comfy_timestep((None,), {"timestep": torch.tensor([[0.0, 900.0], [0.0, 100.0]])}).tolist() == [
        900.0,
        100.0,
    ]
    assert loader.comfy_timestep((None,), {}) is None


def test_checkpoint_list_shows_only_qvgen_checkpoints(fake_host, tmp_path):
    unet, dm = fake_host["dirs"]
    _tiny_comfy_checkpoint(dm / "a" / "tiny.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(unet / "plain.safetensors"))
    folder = dm / "qvgen" / "org--m" / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "qvgen"}}))
    save_file({"w": torch.zeros(1)}, str(folder / "diffusion_pytorch_model.safetensors"))
    (dm / ".cache").mkdir()
    _tiny_comfy_checkpoint(dm / ".cache" / "hidden.safetensors")
    options = loader.checkpoint_options()
    assert options == [
        os.path.join("a", "tiny.safetensors"),
        os.path.join("qvgen", "org--m", "transformer") + os.sep,
        schema.NO_LOCAL,
    ]
    assert loader.checkpoint_options() == options  # second time from the header cache
    assert loader.resolve_checkpoint(options[0]) == (dm / "a" / "tiny.safetensors").resolve()
    _tiny_comfy_checkpoint(tmp_path / "outside.safetensors")
    with pytest.raises(loader.QVGenLoadError, match="not found"):
        loader.resolve_checkpoint("../outside.safetensors")
    with pytest.raises(loader.QVGenLoadError, match="no checkpoint chosen"):
        loader.locate(schema.NO_LOCAL)


def test_locate_with_repo_id_downloads_into_diffusion_models(fake_host, monkeypatch):
    seen = {}

    def fake_fetch(repo_id, revision, base, progress_factory=None, also=None):
        seen.update(repo_id=repo_id, revision=revision, base=base, also=also)
        return base / "x.safetensors"

    monkeypatch.setattr(download, "fetch", fake_fetch)
    path = loader.locate(schema.NO_LOCAL, "org/model", "v1")
    assert seen["base"].name == "diffusion_models" and seen["also"] == fake_host["dirs"]
    assert path == fake_host["dirs"][1] / "x.safetensors" and seen["revision"] == "v1"


# ---- Hub download ----------------------------------------------------------------------------
class FakeApi:
    def __init__(self, files=None, error=None):
        self.files, self.error = files or [], error

    def list_repo_files(self, repo_id, revision=None):
        if self.error:
            raise self.error
        return self.files


def test_fetch_downloads_the_single_file_with_progress(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls, bars = [], []

    def fake_download(repo_id, filename, revision=None, local_dir=None, tqdm_class=None):
        calls.append((repo_id, filename, revision))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm_class(total=100, disable=True)
        bar.update(60)
        bar.update(40)
        bar.close()
        target.write_bytes(b"x")
        return str(target)

    def factory(total):
        bars.append(Bar(total))
        return bars[-1]

    files = ["README.md", "comfyui/m-w4a4.safetensors", "transformer/config.json"]
    got = download.fetch(
        "org/m", "abc123", tmp_path, progress_factory=factory, api=FakeApi(files), download=fake_download
    )
    assert got == tmp_path / "qvgen" / "org--m@abc123" / "comfyui" / "m-w4a4.safetensors"
    assert calls == [("org/m", "comfyui/m-w4a4.safetensors", "abc123")]
    assert bars[0].values[-1] == (100, 100)


def test_fetch_offline_uses_the_earlier_download(tmp_path, monkeypatch):
    earlier = tmp_path / "qvgen" / "org--m" / "comfyui" / "m.safetensors"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download.fetch("org/m", "", tmp_path, api=FakeApi(error=AssertionError("no network use"))) == earlier
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert download.fetch("org/m", None, tmp_path, api=FakeApi(error=ConnectionError("down"))) == earlier
    with pytest.raises(download.DownloadError, match="not downloaded yet and the Hub cannot be reached"):
        download.fetch("org/other", None, tmp_path, api=FakeApi(error=ConnectionError("down")))

    class RepositoryNotFoundError(Exception):
        pass

    with pytest.raises(download.DownloadError, match="not found on the Hugging Face Hub"):
        download.fetch("org/m", None, tmp_path, api=FakeApi(error=RepositoryNotFoundError("404")))
    with pytest.raises(download.DownloadError, match="no QVGen checkpoint"):
        download.fetch("org/m", None, tmp_path, api=FakeApi(["README.md"]), download=lambda *a, **k: "")


def test_repo_files_and_ids():
    folder = ["transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "vae/x.safetensors"]
    assert download.pick_files(folder) == folder[:2]
    assert download.pick_files(["comfyui/b.safetensors", "comfyui/a.safetensors", *folder]) == ["comfyui/a.safetensors"]
    for bad in ("nope", "a/b/c", "../x", "a/.."):
        with pytest.raises(download.DownloadError):
            download.check_repo_id(bad)
    with pytest.raises(download.DownloadError, match="revision"):
        download.local_dir("a/b", "x/../y", Path("/tmp"))


# ---- the quantize node ----------------------------------------------------------------------
def _fp_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Module()
    model.diffusion_model = nn.Module()
    model.diffusion_model.a = nn.Linear(32, 24)
    model.diffusion_model.head = nn.Linear(24, 8)
    return model


def test_quantize_model_patches_a_clone_and_matches_fake_quant(fake_host):
    from qvgen.packed_layer import initial_clip_factors

    model = _fp_model()
    original = model.diffusion_model.a.weight.clone()
    patcher = FakePatcher(model)
    progress = []
    clone, names = quantize.quantize_model(
        patcher,
        weight_bits=4,
        act_bits=4,
        skip=quantize.parse_patterns("head*, "),
        progress=lambda *a: progress.append(a),
    )
    assert names == ["a"] and list(clone.object_patches) == ["diffusion_model.a"] and patcher.object_patches == {}
    assert progress == [(1, 1)] and torch.equal(model.diffusion_model.a.weight, original)
    layer = clone.object_patches["diffusion_model.a"]
    assert type(layer).__name__ == "ComfyPackedLinear" and layer.quantized
    w = model.diffusion_model.a.weight.detach()
    s = ((w.amax(1, keepdim=True) - w.amin(1, keepdim=True)) / 15).clamp(min=1e-5)
    z = -w.amin(1, keepdim=True) / s
    clip = initial_clip_factors(QVGenConfig(n_buckets=1))  # 0.95 · sigmoid(logit(0.95)), as training starts
    torch.testing.assert_close(layer.act_clip, clip, rtol=0, atol=0)
    x = torch.randn(4, 32)
    c = clip[0, 0].item()
    expected = F.linear(fake_quant_act(x, c, c, 4), fake_quant_weight(w, s, z, 4), model.diffusion_model.a.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    clone_w8, _ = quantize.quantize_model(patcher, weight_bits=8, act_bits=None, clip_search=True)
    assert clone_w8.object_patches["diffusion_model.a"].act_bits is None
    with pytest.raises(ValueError, match=r"no full-precision linear layers to quantize \(all 2 match skip"):
        quantize.quantize_model(patcher, skip=["*"])


def test_requantizing_a_cached_model_uses_its_original_layers(fake_host):
    """ComfyUI keeps a sampled clone's object patches applied on the shared model; quantizing the input
    MODEL again (other bits, other skip) must still see, and start from, its full-precision layers."""
    patcher = FakePatcher(_fp_model())
    first, names = quantize.quantize_model(patcher, skip=["head"])
    assert names == ["a"]
    first.patch_model()  # the first clone sampled and stays loaded
    assert type(patcher.model.diffusion_model.a).__name__ == "ComfyPackedLinear"
    second, names = quantize.quantize_model(patcher, weight_bits=3, skip=[])
    assert names == ["a", "head"]  # the skip change takes effect
    fresh, _ = quantize.quantize_model(FakePatcher(_fp_model()), weight_bits=3, skip=[])
    for name in ("diffusion_model.a", "diffusion_model.head"):
        got, want = second.object_patches[name], fresh.object_patches[name]
        assert got.weight_bits == 3
        for key, t in want.named_parameters():
            assert torch.equal(getattr(got, key), t), (name, key)
    with pytest.raises(ValueError, match="already quantized"):
        quantize.quantize_model(second)  # its layers are QVGen layers already


def test_triton_backend_without_triton_gives_advice_for_a_node_pack(fake_host, monkeypatch):
    from qvgen.kernels_import import qvgen_kernels

    monkeypatch.setattr(qvgen_kernels.backend, "triton_importable", lambda: False)
    for run in (
        lambda: loader.load_model(Path("unused.safetensors"), backend="triton"),
        lambda: quantize.quantize_model(FakePatcher(_fp_model()), backend="triton"),
    ):
        with pytest.raises(Exception, match="needs the triton package in the Python that runs ComfyUI") as e:
            run()
        assert f"{sys.executable} -m pip install triton" in str(e.value) and "qvgen[" not in str(e.value)


@pytest.mark.parametrize("term", ["4-bit", "W4A4", "quantize", "Wan"])
def test_nodes_are_found_by_search_terms(term):
    """ComfyUI's node search matches display names (every version) and search aliases (newer ones)."""
    for spec in schema.NODE_SPECS.values():
        words = " ".join([spec.display_name, *spec.search_aliases]).lower()
        assert term.lower() in words, (spec.node_id, term)
        assert term.lower() in spec.description.lower() or term.lower() in spec.display_name.lower()


# ---- the authors' checkpoints ----------------------------------------------------------------
def _authors_folder(folder: Path) -> Path:
    from test_convert_official import authors_state, write_authors
    from tiny_models import tiny_wan

    model = tiny_wan()
    return write_authors(folder, model, authors_state(model))


def test_local_authors_folder_is_converted_once_and_loads(fake_host, tmp_path, monkeypatch):
    src = _authors_folder(tmp_path / "QVGen-Wan-tiny")
    path = loader.locate(schema.NO_LOCAL, str(src))
    base = fake_host["dirs"][1] / "qvgen"
    assert path.is_file() and base in path.parents and path.parent.name == "comfyui"
    from qvgen.adapters.official import convert_to_file  # noqa: F401  (replaced below: no second conversion)

    monkeypatch.setattr("qvgen.adapters.official.convert_to_file", lambda *a, **k: pytest.fail("converted again"))
    assert loader.locate(schema.NO_LOCAL, str(src)) == path
    assert os.path.relpath(path, fake_host["dirs"][1]) in loader.checkpoint_options()  # listed from now on
    loaded = loader.load_model(path)
    dm = loaded.patcher.model.diffusion_model
    state = fake_host["options"]["custom_operations"].qvgen_settings.timestep_state
    dm(torch.randn(2, dm.get_submodule(dm.names[0]).in_features), torch.tensor([437.0, 437.0]))
    assert state.bucket == 437  # 1000 buckets: the authors' pair 437 mod 50 = 37 (their training rule)
    with pytest.raises(download.DownloadError, match="no such file or folder"):
        loader.locate(schema.NO_LOCAL, str(tmp_path / "typo"))
    with pytest.raises(loader.QVGenLoadError, match="not a readable safetensors file"):
        loader.load_model(loader.locate(schema.NO_LOCAL, str(src / "config.json")))  # neither layout


def test_hub_authors_repo_is_downloaded_converted_and_reused_offline(fake_host, tmp_path, monkeypatch):
    import shutil

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    src = _authors_folder(tmp_path / "hub")
    calls, bars = [], []

    def fake_download(repo_id, filename, revision=None, local_dir=None, tqdm_class=None):
        calls.append(filename)
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / Path(filename).name, target)
        bar = tqdm_class(total=10, disable=True)
        bar.update(10)
        bar.close()
        return str(target)

    def factory(total):
        bars.append(Bar(total))
        return bars[-1]

    files = ["README.md", "config.json", "diffusion_pytorch_model.safetensors", "assets/x.png"]
    base = fake_host["dirs"][1]
    got = download.fetch("Harahan/QVGen-Wan-1_3B-W4A4", None, base, progress_factory=factory, api=FakeApi(files),
                         download=fake_download)  # fmt: skip
    assert got == base / "qvgen" / "Harahan--QVGen-Wan-1_3B-W4A4" / "comfyui" / "QVGen-Wan-1_3B-W4A4.safetensors"
    assert calls == ["config.json", "diffusion_pytorch_model.safetensors"] and bars[-1].values[-1] == (10, 10)
    assert not (got.parent.parent / download.AUTHORS_DIR).exists()  # the download is dropped once converted
    from qvgen import load_checkpoint

    assert load_checkpoint(got).config.n_buckets == 1000
    again = download.fetch("Harahan/QVGen-Wan-1_3B-W4A4", None, base, api=FakeApi(files), download=fake_download)
    assert again == got and len(calls) == 2  # online again: nothing downloaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download.fetch("Harahan/QVGen-Wan-1_3B-W4A4", None, base, api=FakeApi(error=AssertionError())) == got
    assert download.authors_files(["transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"])
    assert download.authors_files(["config.json", "README.md"]) == []
