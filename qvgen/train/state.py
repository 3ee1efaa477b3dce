"""Training checkpoints in safetensors + JSON (no pickle): student, optimizer, scheduler, RNG, step.

A checkpoint is a folder `step-NNNNNNN/` written under a temporary name and renamed, so a crash
mid-write never leaves a half checkpoint that a resume would pick up.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..checkpoint import _atomic_dir
from ..layers import QVGenLinear

STEP_PREFIX = "step-"


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        idx, _, k = key.partition(".")
        state.setdefault(int(idx), {})[k] = t
    for idx, sc in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(
    ckpt_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write `ckpt_dir/step-<step>` atomically and prune all but the newest `keep`."""
    target = ckpt_dir / f"{STEP_PREFIX}{step:07d}"
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    model_sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "step": step,
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "extra": extra or {},
    }

    def write(tmp: Path) -> None:
        save_file(model_sd, str(tmp / "student.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=_json_default))

    _atomic_dir(target, write)
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a state.json), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.name.startswith(STEP_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def read_training_state(path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """(student state dict, optimizer tensors, metadata) of one checkpoint folder."""
    try:
        meta = json.loads((path / "state.json").read_text())
        student = load_file(str(path / "student.safetensors"))
        opt = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except Exception as e:  # noqa: BLE001 - any read failure means the same thing to the user
        raise RuntimeError(
            f"{path}: training checkpoint is unreadable ({e}); delete it to restart from the previous one"
        ) from None
    meta["torch_rng"] = rng["torch_rng"]
    return student, opt, meta


def match_phi_structure(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Drop Φ from layers whose saved state has none (rank already decayed to 0)."""
    for name, m in model.named_modules():
        if isinstance(m, QVGenLinear) and m.phi_down is not None and f"{name}.phi_down" not in state:
            m.remove_phi()


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
