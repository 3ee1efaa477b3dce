"""Fakes of the ComfyUI pieces the node pack touches (every ComfyUI call goes through
`qvgen_nodes.host`, which `install_fake_host` replaces), shared by the node tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent


def import_nodes():
    """`qvgen_nodes` imported from this checkout (ComfyUI itself imports the pack folder the same way)."""
    if "qvgen_nodes" not in sys.modules:
        folder = REPO / "qvgen_nodes"
        spec = importlib.util.spec_from_file_location(
            "qvgen_nodes", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["qvgen_nodes"] = module
        spec.loader.exec_module(module)
    return sys.modules["qvgen_nodes"]


class FakeCastOp:
    comfy_cast_weights = False
    weight_function: list = []
    bias_function: list = []


class FakeOps:
    """Stands in for `comfy.ops.manual_cast`: a Linear that casts its weight to the input dtype."""

    class Linear(nn.Linear, FakeCastOp):
        def reset_parameters(self):
            return None

        def forward(self, x):
            b = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), b)


class FakeDiffusionModel(nn.Module):
    """A module tree built from a state dict's layer names with the operations' Linear, like ComfyUI's
    Wan model is built with `operations.Linear`; forward(x, timestep, context) runs one layer."""

    def __init__(self, sd: dict, operations: type, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.names = []
        for key in sd:
            if key.endswith(".weight") and sd[key].dim() == 2:
                name = key[: -len(".weight")]
                out_f, in_f = sd[key].shape
                parent = self
                *path, leaf = name.split(".")
                for p in path:
                    if not hasattr(parent, p):
                        parent.add_module(p, nn.Module())
                    parent = getattr(parent, p)
                parent.add_module(leaf, operations.Linear(in_f, out_f, bias=f"{name}.bias" in sd, dtype=dtype))
                self.names.append(name)

    def forward(self, x, timestep, context=None):
        return self.get_submodule(self.names[0])(x)


class FakePatcher:
    """ComfyUI's `ModelPatcher` as far as the nodes use it: clones share the model and the backup of
    replaced objects; `patch_model` applies object patches to the shared model (ComfyUI leaves them
    applied while the model stays loaded); `get_model_object` looks through them."""

    def __init__(self, model: nn.Module, backup: dict | None = None) -> None:
        self.model = model
        self.object_patches: dict = {}
        self.object_patches_backup = {} if backup is None else backup

    def clone(self) -> FakePatcher:
        c = FakePatcher(self.model, self.object_patches_backup)
        c.object_patches = dict(self.object_patches)
        return c

    def add_object_patch(self, name: str, obj) -> None:
        self.object_patches[name] = obj

    def get_model_object(self, name: str):
        if name in self.object_patches:
            return self.object_patches[name]
        if name in self.object_patches_backup:
            return self.object_patches_backup[name]
        return self.model.get_submodule(name)

    def patch_model(self) -> None:
        for name, obj in self.object_patches.items():
            self.object_patches_backup.setdefault(name, self.model.get_submodule(name))
            self.model.set_submodule(name, obj)


class Bar:
    def __init__(self, total: int) -> None:
        self.total, self.values = total, []

    def update_absolute(self, value, total=None):
        self.values.append((value, total))


def install_fake_host(monkeypatch, dirs: list[Path]) -> dict:
    """Replace `qvgen_nodes.host` with fakes; returns what the fake loader saw (options, keys, …)."""
    import_nodes()
    host = importlib.import_module("qvgen_nodes.host")
    calls: dict = {"dirs": dirs}

    def load_sd(sd, options):
        calls["options"] = options
        calls["keys"] = sorted(sd)
        root = nn.Module()
        root.diffusion_model = FakeDiffusionModel(sd, options["custom_operations"], options.get("dtype"))
        missing, unexpected = root.diffusion_model.load_state_dict(sd, strict=False)
        calls["unexpected"] = unexpected
        return FakePatcher(root)

    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(host, "load_diffusion_model_state_dict", load_sd)
    monkeypatch.setattr(host, "base_ops", lambda: FakeOps)
    monkeypatch.setattr(host, "diffusion_model_dirs", lambda: dirs)
    monkeypatch.setattr(host, "torch_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(host, "offload_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(host, "progress_bar", Bar)
    monkeypatch.setattr(host, "check_interrupted", lambda: None)
    return calls
