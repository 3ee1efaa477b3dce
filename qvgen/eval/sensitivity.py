"""Which layers get 8-bit inputs: the N whose quantization alone costs the most (issue #16 item 3).

The measure is `python -m qvgen.eval`'s "alone" column: the error of the original model's prediction
with only one layer swapped for its round-to-nearest form (the run's config with Φ off), on
calibration inputs. `python -m qvgen.train` and the demo take `--act8-layers auto:N` (pick N) or
`--act8-layers PATTERN[,PATTERN]` (fnmatch patterns), which become `QVGenConfig.layer_act_bits`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import QVGenConfig
from ..surgery import convert_model, quantized_layers
from ..train.objectives import predict
from .layers import LayerProbe, errors_alone

ACT8_BITS = 8
AUTO = "auto:"


@dataclass(frozen=True)
class Act8Layers:
    """`--act8-layers`: `auto` layers picked by measured sensitivity, or fixed `patterns`."""

    auto: int = 0
    patterns: tuple[str, ...] = ()

    def layer_act_bits(self) -> dict[str, int]:
        """The fixed patterns as `QVGenConfig.layer_act_bits` (auto picks are added once measured)."""
        return dict.fromkeys(self.patterns, ACT8_BITS)


def parse_act8_layers(value: str) -> Act8Layers:
    """argparse type of `--act8-layers`: `auto:N` (N ≥ 1) or comma-separated fnmatch patterns."""
    if value.startswith(AUTO):
        n = value[len(AUTO) :]
        if not n.isdigit() or int(n) < 1:
            raise argparse.ArgumentTypeError(f"expected auto:N with N a positive integer, got {value!r}")
        return Act8Layers(auto=int(n))
    patterns = tuple(p for p in value.split(",") if p.strip())
    if not patterns:
        raise argparse.ArgumentTypeError(f"expected auto:N or comma-separated layer patterns, got {value!r}")
    return Act8Layers(patterns=patterns)


@torch.no_grad()
def layer_sensitivity(
    original: nn.Module,
    config: QVGenConfig,
    inputs: list[dict],
    *,
    calibrate: Callable[[nn.Module], None] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Per layer: the MSE of `original`'s prediction with only that layer quantized, averaged over `inputs`.

    The quantized layer is `config`'s round-to-nearest form (rank 0, one activation width; smoothing
    calibrated by `calibrate`, as for training). Costs one forward pass per layer and input.
    """
    ptq = dataclasses.replace(config, rank=0, final_rank=0, current_rank=None, layer_act_bits={})
    quantized = copy.deepcopy(original)
    convert_model(quantized, ptq, progress=progress, calibrate=calibrate)
    probe = LayerProbe(original, quantized.eval())
    points = [{"inputs": x, "timestep": x["timestep"], "reference": predict(original, x).float()} for x in inputs]
    return errors_alone(probe, original, points, progress)


def most_sensitive(sensitivity: dict[str, float], n: int) -> dict[str, float]:
    """The `n` layers with the largest error alone, largest first."""
    return dict(sorted(sensitivity.items(), key=lambda kv: -kv[1])[:n])


def describe(picked: dict[str, float]) -> str:
    """One line saying which layers were picked and their measured sensitivity."""
    layers = ", ".join(f"{n} ({v:.3e})" for n, v in picked.items())
    return f"8-bit inputs on the {len(picked)} most sensitive layer(s) (MSE with only that one quantized): {layers}"


@torch.no_grad()
def linear_macs(model: nn.Module, inputs: dict) -> dict[str, int]:
    """Multiply-accumulates of each quantized layer in one call of `model` (tokens × K × N)."""
    macs: dict[str, int] = {}

    def hook_for(name: str):
        def hook(m: nn.Module, args: tuple, _out: Tensor) -> None:
            x = args[0]
            macs[name] = macs.get(name, 0) + x.numel() * m.out_features

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in quantized_layers(model).items()]
    try:
        predict(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return macs


def act8_mac_fraction(model: nn.Module, inputs: dict) -> float:
    """Share of the quantized layers' MACs that run with 8-bit inputs (`act_bits == 8` layers)."""
    macs = linear_macs(model, inputs)
    layers = quantized_layers(model)
    eight = sum(v for n, v in macs.items() if _act_bits(layers[n]) == ACT8_BITS)
    return eight / max(sum(macs.values()), 1)


def _act_bits(layer: nn.Module) -> int | None:
    aq = getattr(layer, "act_quantizer", None)
    return aq.bits if aq is not None else getattr(layer, "act_bits", None)
