"""The comparison itself: one pass along the original's sampling trajectory per prompt and seed.

At every step both models get the original's current noisy input (teacher forcing), so the velocity
error at step k is the error of one call, not an accumulation; the quantized model also samples on its
own from the same starting noise, and the two final samples are compared as frames.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..demo.teacher import sigma_schedule
from ..train.objectives import predict
from .image_metrics import psnr, ssim
from .layers import LayerProbe, errors_alone, layer_table, most_sensitive

PROBE_SIGMAS = (0.9, 0.5, 0.1)  # trajectory points of the one-layer-at-a-time measurement


def _inputs(x: Tensor, t: Tensor, text: Tensor) -> dict[str, Tensor]:
    return {"hidden_states": x, "timestep": t, "encoder_hidden_states": text}


@torch.no_grad()
def evaluate(
    original: nn.Module,
    quantized: nn.Module,
    prompt_embeds: Tensor,
    seeds: list[int],
    shape: tuple[int, ...],
    *,
    num_steps: int = 20,
    shift: float = 1.0,
    pixel_range: float | None = None,
    one_at_a_time: bool = True,
    max_layers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Velocity error per step, frame PSNR/SSIM (when `pixel_range`: samples are frames in ±range/2) and the
    per-layer table, for flow-matching models with Wan's call convention; prompt `i` is sampled from seed `i`;
    the one-layer-at-a-time pass covers the `max_layers` layers with the largest own error (default all)."""
    if len(seeds) != prompt_embeds.shape[0]:
        raise ValueError(f"{prompt_embeds.shape[0]} prompts but {len(seeds)} seeds: give one seed per prompt")
    sigmas = sigma_schedule(num_steps, shift).tolist()
    probe = LayerProbe(original, quantized)
    sq = torch.zeros(num_steps, dtype=torch.float64)
    ref = torch.zeros(num_steps, dtype=torch.float64)
    points, frames = [], []
    probe_steps = {min(range(num_steps), key=lambda k: abs(sigmas[k] - s)) for s in PROBE_SIGMAS}
    for i in tqdm(range(len(seeds)), desc="qvgen.eval: prompts", disable=not progress):
        text = prompt_embeds[i : i + 1]
        noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seeds[i]))
        x, x_q = noise.clone(), noise.clone()
        for k, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
            t = torch.full((1,), s * 1000.0)
            with probe.measuring(t):
                v = predict(original, _inputs(x, t, text)).float()
            v_tf = predict(quantized, _inputs(x, t, text)).float()  # teacher-forced
            sq[k] += float((v_tf - v).pow(2).mean())
            ref[k] += float(v.pow(2).mean())
            if one_at_a_time and k in probe_steps:
                points.append({"inputs": _inputs(x.clone(), t, text), "timestep": t, "reference": v})
            x_q = x_q + (s_next - s) * predict(quantized, _inputs(x_q, t, text)).float()
            x = x + (s_next - s) * v
        if pixel_range is not None:
            a, b = (z.clamp(-pixel_range / 2, pixel_range / 2)[0] for z in (x, x_q))
            frames.append({"seed": seeds[i], "psnr_db": psnr(b, a, pixel_range), "ssim": ssim(b, a, pixel_range)})
    n = len(seeds)
    per_step = [
        {
            "step": k,
            "sigma": sigmas[k],
            "timestep": sigmas[k] * 1000.0,
            "velocity_mse": float(sq[k] / n),
            "velocity_rel_error": float(sq[k] / ref[k]),
        }
        for k in range(num_steps)
    ]
    alone = None
    if one_at_a_time and max_layers != 0:
        alone = errors_alone(probe, original, points, progress, most_sensitive(probe, max_layers))
    result: dict[str, Any] = {
        "seeds": list(seeds),
        "num_steps": num_steps,
        "shift": shift,
        "velocity_mse_mean": float(sq.sum() / (n * num_steps)),
        "velocity_per_step": per_step,
        "layers": layer_table(probe, alone),
        "frames": None,
    }
    if frames:
        result["frames"] = {
            "psnr_db": sum(f["psnr_db"] for f in frames) / n,
            "ssim": sum(f["ssim"] for f in frames) / n,
            "per_prompt": frames,
        }
    return result
