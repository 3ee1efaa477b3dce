"""Error measurements of a quantized student against its teacher.

The primary figure is the velocity (prediction) error on held-out noised inputs at a fixed grid of
noise levels: it compares the two networks directly, while whole-sample error compounds over the
sampling steps and is noisy at this scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..surgery import quantization_mode
from ..train.objectives import predict

SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class EvalSet:
    """Fixed noised inputs: every held-out clip at every σ of the grid, same noise for every model."""

    x_t: Tensor
    t: Tensor
    text: Tensor

    @classmethod
    def build(cls, clips: Tensor, texts: Tensor, seed: int = 1234, sigmas=SIGMAS) -> EvalSet:
        g = torch.Generator().manual_seed(seed)
        xs, ts, es = [], [], []
        for s in sigmas:
            noise = torch.randn(clips.shape, generator=g)
            xs.append((1 - s) * clips + s * noise)
            ts.append(torch.full((clips.shape[0],), s * 1000.0))
            es.append(texts)
        return cls(torch.cat(xs), torch.cat(ts), torch.cat(es))


@torch.no_grad()
def predictions(model: nn.Module, ev: EvalSet, batch: int = 8) -> Tensor:
    outs = []
    for i in range(0, ev.x_t.shape[0], batch):
        inputs = {
            "hidden_states": ev.x_t[i : i + batch],
            "timestep": ev.t[i : i + batch],
            "encoder_hidden_states": ev.text[i : i + batch],
        }
        outs.append(predict(model, inputs).float())
    return torch.cat(outs)


def mse(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean())


@torch.no_grad()
def velocity_errors(model: nn.Module, reference: Tensor, ev: EvalSet, split: bool = True) -> dict[str, float]:
    """W4A4 velocity MSE, and (training-form models) its weight-only and activation-only parts."""
    out = {"velocity_mse": mse(predictions(model, ev), reference)}
    if split:
        with quantization_mode(model, weights=True, acts=False):
            out["velocity_mse_weights_only"] = mse(predictions(model, ev), reference)
        with quantization_mode(model, weights=False, acts=True):
            out["velocity_mse_acts_only"] = mse(predictions(model, ev), reference)
    return out
