"""The comparison on a diffusers video pipeline (Wan, CogVideoX): its own scheduler, guidance and VAE.

Each prompt is sampled twice from the same seeded generator. First with the original transformer,
every call of which is also handed to the quantized one (teacher forcing on the original's
trajectory, as `run.py` does on the demo; the per-layer probe rides along); then with the quantized
transformer swapped in. The two decoded videos (`output_type="np"`, values in [0, 1]) give PSNR/SSIM.
With classifier-free guidance every transformer call counts (Wan: cond and uncond calls; CogVideoX:
one batched call), so the error is the transformer's, before guidance mixes the outputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..surgery import quantized_layers
from .image_metrics import psnr, ssim
from .layers import LayerProbe, errors_alone, layer_table, most_sensitive

PROBE_FRACTIONS = (0.1, 0.5, 0.9)  # how far into sampling the one-layer-at-a-time points are taken


def _first(out: Any) -> Tensor:
    """The sample of a diffusers transformer output (tuple with `return_dict=False`, else `.sample`)."""
    return out[0] if isinstance(out, tuple) else out.sample


def _detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value


class TransformerTap:
    """Runs the quantized transformer on every call the pipeline makes to the original one, and
    accumulates the squared output error per sampling step (`step` is advanced by the pipeline's
    step-end callback)."""

    def __init__(self, quantized: nn.Module, probe: LayerProbe | None, capture: set[int]) -> None:
        self.quantized, self.probe, self.capture = quantized, probe, capture
        self.step = 0
        self.sq: dict[int, float] = {}
        self.ref: dict[int, float] = {}
        self.calls: dict[int, int] = {}
        self.timestep: dict[int, float] = {}
        self.points: list[dict] = []

    def forward(self, original_forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t = kwargs.get("timestep")
        if t is None or args:
            raise ValueError("qvgen.eval: the pipeline called its transformer without keyword `timestep`")
        with self.probe.measuring(t) if self.probe is not None else nullcontext():
            out = original_forward(**kwargs)
        self._record(kwargs, t, _first(out).float(), _first(self.quantized(**kwargs)).float())
        return out

    def _record(self, kwargs: dict[str, Any], t: Tensor, v: Tensor, v_q: Tensor) -> None:
        k = self.step
        self.sq[k] = self.sq.get(k, 0.0) + float((v_q - v).pow(2).mean())
        self.ref[k] = self.ref.get(k, 0.0) + float(v.pow(2).mean())
        self.calls[k] = self.calls.get(k, 0) + 1
        self.timestep.setdefault(k, float(t.reshape(-1)[0]))
        if k in self.capture:  # a point of the one-layer-at-a-time pass
            inputs = {n: _detached(x) for n, x in kwargs.items() if n != "return_dict"}
            self.points.append({"inputs": inputs, "timestep": t.detach().clone(), "reference": v})


@contextmanager
def tapped(model: nn.Module, tap: TransformerTap) -> Iterator[None]:
    """Inside the block `model`'s forward goes through `tap` (its hooks still run)."""
    original_forward = model.forward
    model.forward = lambda *a, **kw: tap.forward(original_forward, *a, **kw)
    try:
        yield
    finally:
        del model.forward


@contextmanager
def swapped_transformer(pipe: Any, transformer: nn.Module) -> Iterator[None]:
    original = pipe.transformer
    pipe.transformer = transformer
    try:
        yield
    finally:
        pipe.transformer = original


def call_default(pipe: Any, name: str) -> Any:
    """The default of one of the pipeline's `__call__` arguments (e.g. its guidance scale)."""
    param = inspect.signature(pipe.__call__).parameters.get(name)
    return None if param is None else param.default


def _sample(
    pipe: Any, prompt: dict[str, Any], seed: int, call: dict[str, Any], on_step: Callable[[int], None]
) -> np.ndarray:
    def callback(_pipe: Any, i: int, _t: Any, _kw: dict) -> dict:
        on_step(i)
        return {}

    out = pipe(
        **prompt,
        **call,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        callback_on_step_end=callback,
    )
    return np.asarray(out.frames[0], dtype=np.float64)  # (F, H, W, 3) in [0, 1]


def _frame_metrics(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """PSNR/SSIM of the quantized video `b` against the original's `a`, both (F, H, W, 3) in [0, 1]."""
    ta, tb = (torch.from_numpy(x).permute(3, 0, 1, 2) for x in (a, b))  # (C, F, H, W)
    return {"psnr_db": psnr(tb, ta, 1.0), "ssim": ssim(tb, ta, 1.0)}


@torch.no_grad()
def evaluate_pipeline(
    pipe: Any,
    quantized: nn.Module,
    prompts: list[dict[str, Any]],
    seeds: list[int],
    *,
    num_steps: int = 20,
    call: dict[str, Any] | None = None,
    one_at_a_time: bool = True,
    max_layers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Velocity error per step (teacher-forced), PSNR/SSIM of the decoded videos and the per-layer table.

    `prompts[i]` holds the pipeline arguments of prompt `i` (`prompt=` or `prompt_embeds=`, ...), sampled
    from seed `i`; `call` the other pipeline arguments (size, frames, guidance). A quantized model
    without QVGen layers (e.g. a copy of the original) is compared without the per-layer table.
    `first_frames` holds each prompt's (original, quantized) first frame, for `side_by_side`.
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
    if getattr(pipe, "transformer_2", None) is not None:
        raise ValueError("qvgen.eval: two-transformer pipelines (Wan 2.2) are not supported, only `transformer`")
    call = {**(call or {}), "num_inference_steps": num_steps}
    for module in pipe.components.values():  # no dropout: both runs must see the same text embeddings
        if isinstance(module, nn.Module):
            module.eval()
    quantized.eval()
    original = pipe.transformer
    probe = LayerProbe(original, quantized) if quantized_layers(quantized) else None
    capture = {round(f * (num_steps - 1)) for f in PROBE_FRACTIONS} if one_at_a_time and probe else set()
    tap = TransformerTap(quantized, probe, capture)
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=2 * num_steps * len(seeds), desc="qvgen.eval: sampling", disable=not progress)

    def on_step(i: int) -> None:
        tap.step = i + 1
        bar.update()

    frames = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        tap.step = 0
        with tapped(original, tap):
            a = _sample(pipe, prompt, seed, call, on_step)
        with swapped_transformer(pipe, quantized):
            b = _sample(pipe, prompt, seed, call, lambda _i: bar.update())
        frames.append({"seed": seed, **_frame_metrics(a, b), "first_frames": (a[0], b[0])})
    bar.close()
    steps = sorted(tap.calls)
    per_step = [
        {
            "step": k,
            "timestep": tap.timestep[k],
            "velocity_mse": tap.sq[k] / tap.calls[k],
            "velocity_rel_error": tap.sq[k] / max(tap.ref[k], 1e-30),
        }
        for k in steps
    ]
    layers: list[dict] = []
    if probe is not None:
        alone = None
        if capture and max_layers != 0:
            alone = errors_alone(probe, original, tap.points, progress, most_sensitive(probe, max_layers))
        layers = layer_table(probe, alone)
    n = len(seeds)
    return {
        "seeds": list(seeds),
        "num_steps": num_steps,
        "velocity_mse_mean": sum(s["velocity_mse"] for s in per_step) / len(per_step),
        "velocity_per_step": per_step,
        "layers": layers,
        "frames": {
            "psnr_db": sum(f["psnr_db"] for f in frames) / n,
            "ssim": sum(f["ssim"] for f in frames) / n,
            "per_prompt": [{k: v for k, v in f.items() if k != "first_frames"} for f in frames],
        },
        "first_frames": [f["first_frames"] for f in frames],
    }


def side_by_side(first_frames: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """One row per prompt: the original's first frame, the quantized model's, and 4× their difference."""
    rows = [np.concatenate([a, b, np.clip(4 * np.abs(b - a), 0, 1)], axis=1) for a, b in first_frames]
    return (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
