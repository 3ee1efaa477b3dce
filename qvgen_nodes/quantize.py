"""The QVGen quantize node's logic: round-to-nearest W{b}A{b} of any loaded Wan MODEL.

A quick preview of what low-bit inference does to a model, with no QVGen checkpoint and no
training: each linear layer's weight is quantized per output channel (asymmetric min/max, or
QVGen's clip search), activations per token at run time with the clipping a QVGen training run
starts from, through `qvgen.packed_layer.quantize_linear` (the same code as diffusers'
quantize-on-load) and the same packed layers and kernels the QVGen loader uses. The input MODEL
is left untouched: the quantized layers are *object patches* on a clone, so ComfyUI swaps them in
only while the clone samples (a full-precision branch of the same graph keeps the original
layers), and LoRA patches still apply on top.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qvgen.config import QVGenConfig
from qvgen.packed_layer import quantize_linear

from . import host
from .backend_check import check_backend
from .ops import OpsSettings, make_linear_class

log = logging.getLogger("qvgen")


def parse_patterns(text: str) -> list[str]:
    """Comma- or newline-separated fnmatch patterns of module names (ComfyUI's names)."""
    return [p.strip() for p in text.replace("\n", ",").split(",") if p.strip()]


def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and not hasattr(module, "qvgen_settings") and module.weight is not None


def original_linears(patcher: Any) -> list[tuple[str, nn.Module]]:
    """The diffusion model's linear layers as the input MODEL has them.

    While a clone made by this node samples, ComfyUI applies its object patches to the model that
    every clone shares, and may keep them applied after the run (the model stays loaded). Reading
    the module tree would then find QVGen layers where the input MODEL has full-precision ones; so
    each layer is read through ComfyUI's `get_model_object`, which returns the original from the
    backup the clones share (the fakes in the tests do the same).
    """
    model = patcher.model.diffusion_model
    get = getattr(patcher, "get_model_object", None)
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            orig = get(f"diffusion_model.{name}") if get is not None else m
            out.append((name, orig))
    return out


def quantize_model(
    patcher: Any,
    *,
    weight_bits: int = 4,
    act_bits: int | None = 4,
    skip: list[str] | None = None,
    clip_search: bool = False,
    backend: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Any, list[str]]:
    """A clone of `patcher` whose diffusion-model linear layers are RTN-quantized packed layers.

    Returns the clone and the quantized module names. Layers matching `skip` stay as they are.
    The arithmetic is `qvgen.packed_layer.quantize_linear`, the same as diffusers' quantize-on-load.
    """
    check_backend(backend)
    config = QVGenConfig(weight_bits=weight_bits, act_bits=act_bits, rank=0, n_buckets=1)
    skip = skip or []
    linears = [(n, m) for n, m in original_linears(patcher) if _is_plain_linear(m)]
    todo = [(n, m) for n, m in linears if not any(fnmatch.fnmatchcase(n, p) for p in skip)]
    if not todo:
        why = f"all {len(linears)} match skip={skip}" if linears else "it is already quantized or has none"
        raise ValueError(f"the MODEL has no full-precision linear layers to quantize ({why})")
    settings = OpsSettings(config=config, backend=backend)
    linear_cls = make_linear_class(host.base_ops().Linear, settings)
    device, store = host.torch_device(), host.offload_device()
    clone = patcher.clone()
    done: list[str] = []
    for i, (name, m) in enumerate(todo):
        host.check_interrupted()
        w = m.weight.detach().to(device)
        bias = None if m.bias is None else m.bias.detach().to(device)
        compute = w.dtype if w.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        tensors = quantize_linear(w, bias, config, name=name, clip_search=clip_search)
        layer = linear_cls(m.in_features, m.out_features, bias is not None, dtype=compute)
        layer.load_packed({k: v.to(store) for k, v in tensors.items()}, name=name)
        clone.add_object_patch(f"diffusion_model.{name}", layer)
        done.append(name)
        if progress is not None:
            progress(i + 1, len(todo))
    a = "16" if act_bits is None else str(act_bits)
    log.info(
        "QVGen: RTN W%dA%s on %d linear layers (%d kept in full precision by skip)",
        weight_bits,
        a,
        len(done),
        len(linears) - len(done),
    )
    return clone, done
