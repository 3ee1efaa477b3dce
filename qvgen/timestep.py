"""Feeding the diffusion timestep to the activation-clipping buckets.

Every quantized layer of a model shares one `TimestepState`. A forward pre-hook on the model's
root reads its `timestep` argument (diffusers and ComfyUI both pass it second or by name) and
stores the bucket, `floor(t / T_train · n_buckets)`, the same rule in training and inference, so
any scheduler and step count pick the clipping factors the layer was trained with.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

HOOK_ATTR = "_qvgen_timestep_hook"


@dataclass
class TimestepState:
    """Current bucket(s): an int for the whole batch or a (B,) long tensor, one per sample."""

    n_buckets: int = 1
    num_train_timesteps: int = 1000
    bucket: Tensor | int = 0

    def set_timestep(self, t: Tensor | float | int | None) -> None:
        self.bucket = timestep_to_bucket(t, self.n_buckets, self.num_train_timesteps)


def bucket_of(state: TimestepState | None) -> Tensor | int:
    """The bucket a layer reads: its state's, or 0 when the layer is not attached to a model."""
    return 0 if state is None else state.bucket


def timestep_to_bucket(t: Tensor | float | int | None, n_buckets: int, num_train_timesteps: int) -> Tensor | int:
    """Bucket index of timestep(s) `t` in [0, num_train_timesteps]; None → bucket 0; a (B,) long
    tensor for a tensor `t` (B ≥ 1), an int otherwise.

    Multiplied before divided: for integer timesteps `t · n` is exact, so with one bucket per
    training timestep (n_buckets = num_train_timesteps, the authors' `t mod 50` tables) the bucket
    is exactly `floor(t)`, never one below it.
    """
    if t is None or n_buckets == 1:
        return 0
    if isinstance(t, Tensor):
        # stays a tensor on t's device: no host sync per step, and a compiled model sees a tensor
        # input instead of a Python int it would recompile for at every new bucket
        b = torch.floor(t.detach().float().reshape(-1) * n_buckets / num_train_timesteps).long()
        return b.clamp(0, n_buckets - 1) if b.numel() else 0
    return min(max(math.floor(float(t) * n_buckets / num_train_timesteps), 0), n_buckets - 1)


def _extract_timestep(args: tuple, kwargs: dict[str, Any], arg_index: int) -> Any:
    if "timestep" in kwargs:
        return kwargs["timestep"]
    if "timesteps" in kwargs:
        return kwargs["timesteps"]
    return args[arg_index] if len(args) > arg_index else None


def timestep_arg_index(model: nn.Module) -> int:
    """Position of `timestep` in `model.forward` (2nd for Wan and ComfyUI, 3rd for CogVideoX)."""
    try:
        names = [p for p in inspect.signature(model.forward).parameters if p != "self"]
    except (TypeError, ValueError):
        return 1
    for key in ("timestep", "timesteps"):
        if key in names:
            return names.index(key)
    return 1


def attach_timestep_hook(
    model: nn.Module, state: TimestepState, arg_index: int | None = None, extract: Callable[..., Any] | None = None
) -> None:
    """Install (once) the pre-hook that updates `state` from each forward call of `model`."""
    if arg_index is None:
        arg_index = timestep_arg_index(model)
    old = getattr(model, HOOK_ATTR, None)
    if old is not None:
        old.remove()

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        t = extract(args, kwargs) if extract is not None else _extract_timestep(args, kwargs, arg_index)
        state.set_timestep(t)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    object.__setattr__(model, HOOK_ATTR, handle)
