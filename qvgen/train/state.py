"""Training checkpoints in safetensors + JSON (no pickle): student, optimizer, scheduler, RNG, step.

A checkpoint is a folder `step-NNNNNNN/` written under a temporary name and renamed, so a crash
mid-write never leaves a half checkpoint that a resume would pick up. States are whole and keyed by
parameter name (format 2), never by process or shard, so a run resumes on any number of processes.

    student.safetensors    the student's state dict (Φ only in layers whose rank is above 0)
    optimizer.safetensors  `<parameter name>.<state key>` → tensor (AdamW: step, exp_avg, exp_avg_sq)
    rng.safetensors        torch's CPU RNG state
    state.json             step, optimizer param groups (parameter names) and scalars, scheduler
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..atomic import atomic_dir
from ..layers import QVGenLinear

STEP_PREFIX = "step-"
FORMAT = 2
PHI_KEYS = ("phi_down", "phi_up", "phi_mask")


def drop_dormant_phi(model_state: dict[str, Tensor], optim_state: dict | None = None) -> list[str]:
    """Remove Φ whose mask is all zero (rank 0, kept only because a wrapped model cannot lose parameters)."""
    dormant = [k[: -len(".phi_mask")] for k, v in model_state.items() if k.endswith(".phi_mask") and not v.any()]
    for layer in dormant:
        for key in PHI_KEYS:
            model_state.pop(f"{layer}.{key}", None)
    if optim_state is not None and dormant:
        gone = {f"{layer}.{key}" for layer in dormant for key in PHI_KEYS}
        for name in gone:
            optim_state["state"].pop(name, None)
        for group in optim_state["param_groups"]:
            group["params"] = [p for p in group["params"] if p not in gone]
    return dormant


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, st in state["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{name}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(name), {})[k] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        name, _, k = key.rpartition(".")  # state keys (exp_avg, ...) have no dots; names do
        state.setdefault(name, {})[k] = t
    for name, sc in meta["scalars"].items():
        state.setdefault(name, {}).update(sc)
    return {"state": state, "param_groups": meta["param_groups"]}


def write_training_state(
    ckpt_dir: Path,
    step: int,
    model_state: dict[str, Tensor],
    optim_state: dict[str, Any],
    scheduler_state: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write whole, name-keyed states as `ckpt_dir/step-<step>` atomically; prune all but the newest `keep`."""
    target = ckpt_dir / f"{STEP_PREFIX}{step:07d}"
    opt_tensors, opt_meta = _flatten_optimizer(optim_state)
    model_sd = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
    meta = {"format": FORMAT, "step": step, "optimizer": opt_meta, "scheduler": scheduler_state, "extra": extra or {}}

    def write(tmp: Path) -> None:
        save_file(model_sd, str(tmp / "student.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=_json_default))

    atomic_dir(target, write)
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


def checkpoint_keys(path: Path) -> set[str]:
    """Names in a checkpoint's student state, read from the file header only."""
    with safe_open(str(path / "student.safetensors"), framework="pt") as f:
        return set(f.keys())


def optimizer_state(
    tensors: dict[str, Tensor], meta: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The name-keyed optimizer state of a checkpoint. Format 1 keyed it by position in `optimizer`'s
    parameter order (that of a single-process run, after Φ's removal), which is translated here."""
    if meta.get("format", 1) >= 2:
        return _unflatten_optimizer(tensors, meta["optimizer"])
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        idx, _, k = key.partition(".")
        state.setdefault(order[int(idx)], {})[k] = t
    for idx, sc in meta["optimizer"]["scalars"].items():
        state.setdefault(order[int(idx)], {}).update(sc)
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in meta["optimizer"]["param_groups"]]
    return {"state": state, "param_groups": groups}


def match_phi_structure(model: nn.Module, state: dict[str, Tensor] | set[str]) -> list[str]:
    """Drop Φ from layers whose saved state has none (rank already decayed to 0); their names."""
    removed = []
    for name, m in model.named_modules():
        if isinstance(m, QVGenLinear) and m.phi_down is not None and f"{name}.phi_down" not in state:
            m.remove_phi()
            removed.append(name)
    return removed
