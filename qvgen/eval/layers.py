"""Which layers carry the error: each quantized layer fed the exact input of its full-precision twin.

While the original model runs, a forward hook on each of its linear layers also runs the quantized
model's layer of the same name on the same input. Two measures per layer:
- the layer's own output error (relative squared error; no error from earlier layers mixed in);
- "alone": the velocity error of the original with only this layer swapped for its quantized form.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..surgery import quantized_layers
from ..timestep import TimestepState


class LayerProbe:
    def __init__(self, original: nn.Module, quantized: nn.Module) -> None:
        qlayers = quantized_layers(quantized)
        if not qlayers:
            raise ValueError("the quantized model has no QVGen layers (QVGenLinear / PackedLinear / ConvRotLinear)")
        modules = dict(original.named_modules())
        missing = [n for n in qlayers if not isinstance(modules.get(n), nn.Linear)]
        if missing:
            raise ValueError(f"the original model has no linear layer named {missing[:3]} (the quantized one does)")
        self.pairs = {n: (modules[n], q) for n, q in qlayers.items()}
        self.state: TimestepState | None = next(
            (q.timestep_state for q in qlayers.values() if getattr(q, "timestep_state", None) is not None), None
        )
        self.sq_err = dict.fromkeys(self.pairs, 0.0)
        self.sq_ref = dict.fromkeys(self.pairs, 0.0)

    def _set_timestep(self, t: Tensor) -> None:
        if self.state is not None:
            self.state.set_timestep(t)

    @contextmanager
    def measuring(self, t: Tensor) -> Iterator[None]:
        """Accumulate every layer's output error over the original's forward passes inside the block."""
        self._set_timestep(t)

        def hook_for(name: str, q: nn.Module):
            def hook(_m: nn.Module, args: tuple, out: Tensor) -> None:
                yq = q(args[0]).float()
                self.sq_err[name] += float((yq - out.float()).pow(2).sum())
                self.sq_ref[name] += float(out.float().pow(2).sum())

            return hook

        handles = [lin.register_forward_hook(hook_for(n, q)) for n, (lin, q) in self.pairs.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def swapped(self, name: str, t: Tensor) -> Iterator[None]:
        """Inside the block the original computes layer `name` with its quantized form."""
        self._set_timestep(t)
        lin, q = self.pairs[name]
        handle = lin.register_forward_hook(lambda _m, args, out: q(args[0]).to(out.dtype))
        try:
            yield
        finally:
            handle.remove()

    def output_errors(self) -> dict[str, float]:
        """Relative squared output error per layer, `Σ|y_q − y|² / Σ|y|²` over everything measured."""
        return {n: self.sq_err[n] / max(self.sq_ref[n], 1e-30) for n in self.pairs}


def layer_table(probe: LayerProbe, alone: dict[str, float] | None) -> list[dict]:
    """Rows sorted by the error each layer causes alone (else by its own output error), largest first;
    layers `alone` leaves out (a `--max-layers` cap) follow, by their own output error."""
    rel = probe.output_errors()
    alone = alone or {}
    rows = [
        {"layer": n, "output_rel_error": rel[n], **({"velocity_mse_alone": alone[n]} if n in alone else {})}
        for n in probe.pairs
    ]
    return sorted(rows, key=lambda r: (-r.get("velocity_mse_alone", -1.0), -r["output_rel_error"]))


def most_sensitive(probe: LayerProbe, count: int | None) -> list[str]:
    """The `count` layers with the largest own output error (all when None): where a capped
    one-at-a-time pass spends its forward passes."""
    rel = probe.output_errors()
    return sorted(rel, key=lambda n: -rel[n])[:count]


@torch.no_grad()
def errors_alone(
    probe: LayerProbe, original: nn.Module, points: list[dict], progress: bool, names: list[str] | None = None
) -> dict[str, float]:
    """Velocity MSE of the original with one layer quantized at a time (each of `names`, default all),
    averaged over trajectory `points`."""
    from tqdm.auto import tqdm

    from ..train.objectives import predict

    out = {}
    for name in tqdm(names or list(probe.pairs), desc="qvgen.eval: one layer at a time", disable=not progress):
        total = 0.0
        for p in points:
            with probe.swapped(name, p["timestep"]):
                v = predict(original, p["inputs"]).float()
            total += float((v - p["reference"]).pow(2).mean())
        out[name] = total / len(points)
    return out
