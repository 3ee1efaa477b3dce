"""Model surgery: swap `nn.Linear` layers for QVGen's training or inference form.

Works on any PyTorch model; the diffusers Wan and CogVideoX transformers are tested. Convolutions
(patch embedding), norms, attention matmuls are left alone, as DESIGN.md part A prescribes.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import QVGenConfig
from .layers import QVGenLinear
from .schemes import INFERENCE_TYPES, get_scheme
from .timestep import TimestepState, attach_timestep_hook
from .transforms import rotate, uses_smoothing

STATE_ATTR = "_qvgen_timestep_state"


@dataclass
class ConversionReport:
    """What a conversion touched: module paths converted, those skipped by the config, and those the
    scheme cannot quantize (ConvRot: K not a multiple of 256), which stay in full precision."""

    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    quantized_params: int = 0
    total_params: int = 0
    unsupported: list[str] = field(default_factory=list)
    unsupported_why: str = ""  # the scheme's reason for the first of them

    def __str__(self) -> str:
        pct = 100.0 * self.quantized_params / max(self.total_params, 1)
        text = (
            f"QVGen: converted {len(self.converted)} linear layers ({self.quantized_params:,} of "
            f"{self.total_params:,} parameters, {pct:.1f}%); left in full precision: "
            f"{len(self.skipped) + len(self.unsupported)}"
        )
        if self.unsupported:
            names = ", ".join(self.unsupported[:5]) + ("…" if len(self.unsupported) > 5 else "")
            text += f" ({len(self.unsupported)} because {self.unsupported_why}: {names})"
        return text


def _linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """(module path, layer) of every linear layer still to convert; swaps use `nn.Module.set_submodule`."""
    for name, module in list(model.named_modules()):
        if _is_foreign_linear(module):
            yield name, module


def _is_foreign_linear(module: nn.Module) -> bool:
    """Linear subclasses of other frameworks (e.g. ComfyUI's ops) count as linear layers."""
    return isinstance(module, nn.Linear) and not isinstance(module, (QVGenLinear, *INFERENCE_TYPES))


def unsupported_reason(linear: nn.Module, config: QVGenConfig) -> str | None:
    """Why the scheme cannot quantize this layer (it then stays in full precision), or None."""
    return get_scheme(config.scheme).unsupported(linear.in_features)


def timestep_state(model: nn.Module, config: QVGenConfig) -> TimestepState:
    """The model's shared timestep state (created and hooked on first use)."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        state = TimestepState(config.n_buckets, config.num_train_timesteps)
        object.__setattr__(model, STATE_ATTR, state)
        attach_timestep_hook(model, state)
    return state


def convert_model(
    model: nn.Module,
    config: QVGenConfig,
    *,
    init: bool = True,
    progress: bool = True,
    calibrate: Callable[[nn.Module], None] | None = None,
) -> ConversionReport:
    """Replace matching linear layers with `QVGenLinear` (in place) and report what changed.

    `init=True` runs the weight clip search and Φ's SVD init; pass False when a checkpoint's
    state will be loaded right after. With smoothing, `calibrate(model)` runs a few forward
    passes whose inputs set the smoothing scales (without it the scales start at 1).
    """
    report = ConversionReport(total_params=sum(p.numel() for p in model.parameters()))
    state = timestep_state(model, config)
    todo = []
    for name, linear in _linears(model):
        if not config.should_convert(name):
            report.skipped.append(name)
        elif why := unsupported_reason(linear, config):
            report.unsupported.append(name)
            report.unsupported_why = report.unsupported_why or why
        else:
            todo.append((name, linear))
    _warn_unmatched(config, [name for name, _ in todo])
    for name, linear in tqdm(todo, desc="QVGen: quantizing layers", disable=not progress):
        layer = QVGenLinear.from_linear(linear, config, init=False, name=name)
        layer.timestep_state = state
        model.set_submodule(name, layer)
        report.converted.append(name)
        report.quantized_params += linear.weight.numel()
    if init:
        if uses_smoothing(config.input_transform):
            if calibrate is None:
                warnings.warn("smoothing without calibration data: scales start at 1", stacklevel=2)
            else:
                calibrate_smoothing(model, calibrate, config.smooth_alpha)
        layers = [m for m in model.modules() if isinstance(m, QVGenLinear)]
        for layer in tqdm(layers, desc="QVGen: initialising quantizers", disable=not progress):
            layer.init_quantization()
    return report


def _warn_unmatched(config: QVGenConfig, names: list[str]) -> None:
    """A `layer_act_bits` pattern that names no quantized layer is most likely a typo."""
    unmatched = [p for p in config.layer_act_bits if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        warnings.warn(f"layer_act_bits: pattern(s) {unmatched} match no quantized layer", stacklevel=3)


@torch.no_grad()
def calibrate_smoothing(model: nn.Module, run: Callable[[nn.Module], None], alpha: float) -> None:
    """Per-channel max |input| of every layer (in its rotated space) over `run(model)`, then SmoothQuant scales."""
    stats: dict[tuple[QVGenLinear, int | None], Tensor] = {}
    layers = [m for m in model.modules() if isinstance(m, QVGenLinear)]

    def hook(layer: QVGenLinear, args: tuple) -> None:
        x = args[0].detach().float()
        if layer.input_signs is not None:
            x = rotate(x, layer.input_signs, layer.rot_block)
        for group, rows in layer.calibration_rows(x):  # the whole input, then per smoothing group
            amax = rows.abs().reshape(-1, x.shape[-1]).amax(dim=0)
            key = (layer, group)
            stats[key] = torch.maximum(stats[key], amax) if key in stats else amax

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        with quantization_mode(model, weights=False, acts=False):
            run(model)
    finally:
        for h in handles:
            h.remove()
    for (layer, group), amax in sorted(stats.items(), key=lambda kv: kv[0][1] is not None):  # all rows first
        layer.set_smoothing(amax, alpha, group)


def build_packed_model(
    model: nn.Module,
    config: QVGenConfig,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    rank: int | None = None,
) -> ConversionReport:
    """Replace matching linear layers with empty `PackedLinear` shells, ready for a state dict.

    Works on a model created on the `meta` device, so no full-precision copy is materialised.
    """
    report = ConversionReport(total_params=sum(p.numel() for p in model.parameters()))
    state = timestep_state(model, config)
    rank = config.current_rank if rank is None else rank
    for name, linear in _linears(model):
        if not config.should_convert(name):
            report.skipped.append(name)
            continue
        if why := unsupported_reason(linear, config):
            report.unsupported.append(name)
            report.unsupported_why = report.unsupported_why or why
            continue
        r = min(rank or 0, linear.in_features, linear.out_features)
        layer = packed_shell(linear, config, r, dtype, device if device is not None else linear.weight.device)
        if (bits := config.act_bits_of(name)) != config.act_bits:
            layer.set_input_bits(bits)  # per-layer activation width (`layer_act_bits`; qvgen scheme only)
        layer.timestep_state = state
        model.set_submodule(name, layer)
        report.converted.append(name)
        report.quantized_params += linear.weight.numel()
    return report


def packed_shell(
    linear: nn.Module, config: QVGenConfig, rank: int, dtype: torch.dtype, device: torch.device | str
) -> nn.Module:
    """An empty inference layer of the config's scheme with the shape of `linear`."""
    return get_scheme(config.scheme).shell(linear, config, rank, dtype, device)


@torch.no_grad()
def pack_model(model: nn.Module, config: QVGenConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Turn a trained (or freshly converted) model into its packed inference form, in place."""
    state = timestep_state(model, config)
    for name, module in list(model.named_modules()):
        if not isinstance(module, QVGenLinear):
            continue
        layer = module.scheme.pack(module, config, dtype, name)
        layer.timestep_state = state
        model.set_submodule(name, layer)
    return model


@contextmanager
def quantization_mode(model: nn.Module, *, weights: bool = True, acts: bool = True) -> Iterator[None]:
    """Temporarily switch weight / activation fake quantization of a training-form model."""
    layers = [m for m in model.modules() if isinstance(m, QVGenLinear)]
    saved = [(m.quantize_weights, m.quantize_acts) for m in layers]
    for m in layers:
        m.quantize_weights, m.quantize_acts = weights, acts
    try:
        yield
    finally:
        for m, (w, a) in zip(layers, saved, strict=True):
            m.quantize_weights, m.quantize_acts = w, a


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every QVGen layer of a model, training form or any scheme's inference form, by module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QVGenLinear, *INFERENCE_TYPES))}


def current_rank(model: nn.Module) -> int:
    """Largest live Φ rank over the model's quantized layers (0 when Φ is gone)."""
    return max((m.rank for m in quantized_layers(model).values()), default=0)
