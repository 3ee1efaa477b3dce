"""QVGen layers under ComfyUI's own memory management, driven in-process on the CPU.

ComfyUI's `ModelPatcher.load` decides per module what stays on the offload device (`--lowvram`
partial loading) and, in 0.29, `ModelPatcherDynamic.load` prepares modules for dynamic VRAM
loading (comfy-aimdo); both attach LoRA patches as per-call functions. On a GPU machine they run
with `load_device=cuda`; here the same code runs with the CPU as both devices (the dynamic patcher
is built past its CPU reroute), which exercises every decision it takes but not the copies.
Checked: every tensor of a QVGen layer ends where its forward can use it, and the LoRA delta reaches
the forward in each mode, equal to the fully patched model.

Needs a ComfyUI checkout importable in this interpreter:
    COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/test_comfyui_memory.py
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from comfy_fakes import import_nodes
from torch import nn

REPO = Path(__file__).resolve().parent.parent
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout to drive its loading code"),
]

IN_F, OUT_F, RANK = 256, 192, 4  # > 16 KB per layer: ComfyUI's dynamic loader streams weight/bias of such


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI's modules, imported from COMFYUI_PATH for the CPU (a failure here is a failure)."""
    spec = importlib.util.spec_from_file_location("comfyui_launch", REPO / "scripts" / "comfyui_launch.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    launch._torchvision_workaround()
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops

    return comfy


def _model(comfy, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """A diffusion-model-like stack of QVGen layers built with ComfyUI's `manual_cast` operations."""
    from qvgen import QVGenConfig
    from qvgen.packed_layer import quantize_linear

    import_nodes()
    from qvgen_nodes.ops import OpsSettings, make_ops

    torch.manual_seed(seed)
    cfg = QVGenConfig(rank=0, n_buckets=1)
    ops = make_ops(comfy.ops.manual_cast, OpsSettings(config=cfg, backend="cpu"))
    root = nn.Module()
    root.diffusion_model = nn.Sequential()
    for i in range(2):
        lin = nn.Linear(IN_F, OUT_F if i else IN_F)
        layer = ops.Linear(lin.in_features, lin.out_features, dtype=torch.float32)
        layer.load_packed(quantize_linear(lin.weight, lin.bias, cfg, clip_search=False), name=str(i))
        root.diffusion_model.append(layer)
    return root, ["diffusion_model.0.weight", "diffusion_model.1.weight"]


def _lora(comfy, keys: list[str], layers: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """A rank-4 LoRA on every layer, loaded by ComfyUI's own LoRA loader; also the dense deltas."""
    g = torch.Generator().manual_seed(7)
    sd, to_load, deltas = {}, {}, {}
    for i, key in enumerate(keys):
        m = layers[i]
        up = torch.randn(m.out_features, RANK, generator=g) * 0.05
        down = torch.randn(RANK, m.in_features, generator=g) * 0.05
        sd[f"l{i}.lora_up.weight"], sd[f"l{i}.lora_down.weight"] = up, down
        to_load[f"l{i}"] = key
        deltas[key] = up @ down
    return comfy.lora.load_lora(sd, to_load), deltas


def _reference(model: nn.Module, deltas: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """W4A4 forward with `x Δᵀ` added per layer, computed outside ComfyUI."""
    for i, layer in enumerate(model.diffusion_model):
        d = deltas[f"diffusion_model.{i}.weight"]
        x = layer(x) + x @ d.T
    return x


class _HostBuffer:
    """comfy-aimdo's pinned host buffer needs its native CUDA library; the CPU run pins nothing."""

    def __init__(self, *args, **kwargs) -> None:
        self.size = 0

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: 0


def _dynamic_patcher(comfy, model: nn.Module, monkeypatch):
    """0.29's `ModelPatcherDynamic`, built past the `__new__` that reroutes CPU load devices."""
    cls = getattr(comfy.model_patcher, "ModelPatcherDynamic", None)
    if cls is None:
        pytest.skip("this ComfyUI has no dynamic VRAM loading (ModelPatcherDynamic, 0.29 and later)")
    monkeypatch.setattr(comfy.model_patcher.comfy_aimdo.host_buffer, "HostBuffer", _HostBuffer)
    cpu = torch.device("cpu")
    patcher = object.__new__(cls)
    patcher.__init__(model, cpu, cpu)
    return patcher


@pytest.mark.parametrize("mode", ["full", "lowvram", "dynamic"])
def test_lora_reaches_the_forward_under_every_loading_mode(comfy, mode, monkeypatch):
    model, keys = _model(comfy)
    x = torch.randn(3, IN_F)
    with torch.no_grad():
        want = _reference(model, _lora(comfy, keys, model.diffusion_model)[1], x)
    cpu = torch.device("cpu")
    if mode == "dynamic":
        patcher = _dynamic_patcher(comfy, model, monkeypatch)
    else:
        patcher = comfy.model_patcher.ModelPatcher(model, cpu, cpu)
    patches, _ = _lora(comfy, keys, model.diffusion_model)
    patcher.add_patches(patches, 1.0)
    if mode == "full":
        patcher.load(cpu, lowvram_model_memory=0, full_load=True)
    elif mode == "lowvram":
        patcher.load(cpu, lowvram_model_memory=1)  # nothing fits: every layer offloaded, patched per call
        assert all(m.weight_function for m in model.diffusion_model)
    else:
        patcher.load(cpu)
        assert all(getattr(m, "weight_lowvram_function", None) is not None for m in model.diffusion_model)
    with torch.no_grad():
        got = model.diffusion_model(x)
    # the delta is factored (relative error ≤ LORA_REL_TOL = 1e-3 of ‖Δ‖) and added in fp32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-4)
    if mode != "full":  # and cached between calls while the patch lists stay the same
        assert all(m._lowvram_delta is not None for m in model.diffusion_model)
    if mode == "dynamic":  # its unpatch asserts a GPU load device; a load without patches clears the hooks
        patcher.patches.clear()
        patcher.load(cpu)
    else:
        patcher.unpatch_model(cpu)
    with torch.no_grad():
        plain = model.diffusion_model(x)
        assert not torch.allclose(plain, got, atol=1e-3)  # unpatching removes the LoRA again


def test_dynamic_loading_leaves_only_weight_and_bias_to_the_layer(comfy, monkeypatch):
    """ComfyUI 0.29's dynamic loader force-loads every parameter but `weight` and `bias` of a large
    module (it streams those itself); the layer's forward brings any tensor left elsewhere along."""
    model, keys = _model(comfy)
    before = {n: p for n, p in model.named_parameters()}
    _dynamic_patcher(comfy, model, monkeypatch).load(torch.device("cpu"))
    after = dict(model.named_parameters())
    moved = {n.rpartition(".")[2] for n in after if after[n] is not before.get(n)}
    kept = {n.rpartition(".")[2] for n in after if after[n] is before.get(n)}
    assert {"qweight", "weight_scale", "weight_zero", "weight_qsum", "act_clip"} <= moved
    assert kept <= {"weight", "bias"}  # what the layer's forward must move itself (see ops._on_device)
