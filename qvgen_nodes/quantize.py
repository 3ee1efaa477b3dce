"""The QVGen quantize node's logic: round-to-nearest W{b}A{b} of any loaded Wan MODEL.

A quick preview of what low-bit inference does to a model, with no QVGen checkpoint and no
training: each linear layer's weight is quantized per output channel (asymmetric min/max, or
QVGen's clip search), activations per token at run time, with the same packed layers and kernels
the QVGen loader uses. The input MODEL is left untouched: the quantized layers are *object
patches* on a clone, so ComfyUI swaps them in only while the clone samples (a full-precision
branch of the same graph keeps the original layers), and LoRA patches still apply on top.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import host
from .ops import OpsSettings, make_linear_class

log = logging.getLogger("qvgen")


def parse_patterns(text: str) -> list[str]:
    """Comma- or newline-separated fnmatch patterns of module names (ComfyUI's names)."""
    return [p.strip() for p in text.replace("\n", ",").split(",") if p.strip()]


@torch.no_grad()
def rtn_tensors(weight: Tensor, bias: Tensor | None, weight_bits: int, act_bits: int | None, clip_search: bool):
    """Packed-layer tensors (docs/format.md) of a full-precision linear layer, round-to-nearest."""
    from qvgen.kernels_import import qvgen_kernels
    from qvgen.quantizers import SCALE_MIN, init_weight_qparams, quantize_weight_int

    w = weight.detach().float()
    qmax = 2**weight_bits - 1
    if clip_search:
        s, z = init_weight_qparams(w, weight_bits)
    else:
        wmin, wmax = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        s = ((wmax - wmin) / qmax).clamp(min=SCALE_MIN)
        z = -wmin / s
    q = quantize_weight_int(w, s, z, weight_bits)
    out: dict[str, Tensor] = {
        "qweight": qvgen_kernels.pack_weight(q, weight_bits),
        "weight_scale": s.reshape(-1).float().contiguous(),
        "weight_zero": z.reshape(-1).float().contiguous(),
        "weight_qsum": q.to(torch.int32).sum(dim=1).to(torch.int32),
    }
    if act_bits is not None:
        out["act_clip"] = torch.ones(1, 2, device=w.device)  # no clipping: plain per-token min/max
    if bias is not None:
        out["bias"] = bias.detach()
    return out


def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and not hasattr(module, "qvgen_settings")


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
    """
    from qvgen.config import QVGenConfig

    config = QVGenConfig(weight_bits=weight_bits, act_bits=act_bits, rank=0, n_buckets=1, act_clip_init=1.0)
    skip = skip or []
    model = patcher.model.diffusion_model
    todo = [
        (name, m)
        for name, m in model.named_modules()
        if _is_plain_linear(m) and m.weight is not None and not any(fnmatch.fnmatchcase(name, p) for p in skip)
    ]
    if not todo:
        raise ValueError("the MODEL has no full-precision linear layers to quantize")
    settings = OpsSettings(config=config, backend=backend)
    linear_cls = make_linear_class(host.base_ops().Linear, settings)
    device, store = host.torch_device(), host.offload_device()
    clone = patcher.clone()
    done: list[str] = []
    for i, (name, m) in enumerate(todo):
        host.check_interrupted()
        w = m.weight.detach().to(device)
        bias = None if m.bias is None else m.bias.detach()
        compute = w.dtype if w.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        tensors = rtn_tensors(w, bias, weight_bits, act_bits, clip_search)
        layer = linear_cls(m.in_features, m.out_features, bias is not None, dtype=compute)
        layer.load_packed({k: v.to(store) for k, v in tensors.items()}, name=name)
        clone.add_object_patch(f"diffusion_model.{name}", layer)
        done.append(name)
        if progress is not None:
            progress(i + 1, len(todo))
    a = "16" if act_bits is None else str(act_bits)
    log.info("QVGen: RTN W%dA%s on %d linear layers (skipped %d)", weight_bits, a, len(done), len(skip))
    return clone, done
