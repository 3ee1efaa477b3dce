"""The PNG of an evaluation: velocity error per sampling step, and the layers that carry the most error."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(result: dict[str, Any], path: Path, top: int = 12) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["velocity_per_step"]
    rows = result["layers"]
    key = "velocity_mse_alone" if rows and "velocity_mse_alone" in rows[0] else "output_rel_error"
    rows = [r for r in rows if key in r][:top]  # a --max-layers cap measures only the first rows alone
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110, gridspec_kw={"width_ratios": [1, 1.2]})
    ax.plot([s["timestep"] for s in steps], [s["velocity_mse"] for s in steps], marker="o", ms=3)
    ax.set_xlabel("timestep (flow matching: 1000 σ); sampling runs left to right")
    ax.set_ylabel("velocity MSE vs original")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_title("error per sampling step (teacher-forced)")
    bx.barh([r["layer"] for r in rows][::-1], [r[key] for r in rows][::-1])
    bx.set_xlabel("velocity MSE, only this layer quantized" if key == "velocity_mse_alone" else "relative output error")
    bx.set_title(f"top {len(rows)} layers")
    bx.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
