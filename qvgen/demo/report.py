"""Pictures of a demo run: the side-by-side animation and the loss curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def _to_uint8(video: Tensor) -> np.ndarray:
    """(C, F, H, W) in [-1, 1] → (F, H, W, C) uint8."""
    v = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).cpu().numpy()


def write_comparison_gif(
    path: Path, columns: dict[str, list[Tensor]], scale: int = 4, fps: int = 6, label_height: int = 12
) -> Path:
    """One row per prompt, one column per model (e.g. FP | PTQ | QAT | QVGen), looping GIF."""
    import imageio.v2 as imageio
    from PIL import Image, ImageDraw

    names = list(columns)
    rows = len(columns[names[0]])
    first = _to_uint8(columns[names[0]][0])
    f, h, w, _ = first.shape
    sep = 2
    width = len(names) * (w * scale + sep) - sep
    height = label_height + rows * (h * scale + sep) - sep
    frames = []
    for fi in range(f):
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for ci, name in enumerate(names):
            x0 = ci * (w * scale + sep)
            draw.text((x0 + 2, 0), name, fill=(0, 0, 0))
            for ri in range(rows):
                frame = _to_uint8(columns[name][ri])[fi]
                img = Image.fromarray(frame).resize((w * scale, h * scale), Image.NEAREST)
                canvas.paste(img, (x0, label_height + ri * (h * scale + sep)))
        frames.append(np.asarray(canvas))
    imageio.mimsave(path, frames, duration=1000 / fps, loop=0)
    imageio.imwrite(path.with_suffix(".png"), frames[len(frames) // 2])  # a still for the README
    return path


def plot_losses(path: Path, histories: dict[str, list[dict]]) -> Path:
    """KD loss per step for each trained method, with Φ's rank on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax2 = ax.twinx()
    for name, hist in histories.items():
        steps = [r["step"] for r in hist]
        loss = np.array([r["loss"] for r in hist])
        k = max(1, len(loss) // 30)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        (line,) = ax.plot(steps[k - 1 :], smooth, label=f"{name} KD loss")
        ranks = [r["rank"] for r in hist]
        if max(ranks) > 0:
            ax2.step(steps, ranks, where="post", linestyle="--", color=line.get_color(), label=f"{name} Φ rank")
    ax.set_xlabel("step")
    ax.set_ylabel(f"distillation loss (moving average of {k})")
    ax.set_yscale("log")
    ax2.set_ylabel("Φ rank")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    ax.set_title("W4A4 QAT on the demo teacher")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
