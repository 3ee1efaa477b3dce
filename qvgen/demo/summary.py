"""Several seeds → one figure per method: the mean, the spread (sample standard deviation) and each seed's value.

A difference between two methods means something only when it is larger than the spread across
seeds (training data, noise draws and batch order all change with the seed).
"""

from __future__ import annotations

import statistics
from typing import Any

# per-method figures aggregated over seeds (ratios are taken per seed, then averaged)
AGGREGATED = (
    "velocity_mse",
    "velocity_mse_weights_only",
    "velocity_mse_acts_only",
    "velocity_mse_vs_ptq",
    "velocity_mse_vs_qvgen",
    "final_train_loss",
    "train_seconds",
)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(per_seed: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`{seed: {"methods": {name: {key: value}}}}` → `{name: {key: mean, key_std: …, key_per_seed: […]}}`.

    Keys that only the first seed has (sample MSE, Φ's rank history) are copied from it.
    """
    seeds = list(per_seed)
    first = per_seed[seeds[0]]["methods"]
    out: dict[str, dict[str, Any]] = {}
    for name, m0 in first.items():
        row: dict[str, Any] = {k: v for k, v in m0.items() if k not in AGGREGATED}
        for key in AGGREGATED:
            if key not in m0:
                continue
            values = [per_seed[s]["methods"][name][key] for s in seeds]
            row[key], row[f"{key}_std"] = mean_std(values)
            row[f"{key}_per_seed"] = values
        out[name] = row
    return out


def _cell(m: dict[str, Any], key: str, fmt: str) -> str:
    if key not in m:
        return "–"
    std = m.get(f"{key}_std", 0.0)
    return f"{m[key]:{fmt}}" + (f" ± {std:{fmt}}" if len(m.get(f"{key}_per_seed", [])) > 1 else "")


def table(metrics: dict[str, Any]) -> str:
    """The markdown table printed at the end of a run (mean ± std over seeds when several)."""
    lines = [
        "| method | velocity MSE | × PTQ | × QVGen | weight part | activation part | sample MSE |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in metrics["methods"].items():
        cells = [
            _cell(m, "velocity_mse", ".5f"),
            _cell(m, "velocity_mse_vs_ptq", ".3f"),
            _cell(m, "velocity_mse_vs_qvgen", ".3f"),
            _cell(m, "velocity_mse_weights_only", ".5f"),
            _cell(m, "velocity_mse_acts_only", ".5f"),
            _cell(m, "sample_mse", ".5f"),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
