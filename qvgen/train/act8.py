"""`python -m qvgen.train --act8-layers auto:N`: measure each layer's sensitivity, pick N, remember the pick.

The measurement (`qvgen.eval.sensitivity`) runs on the teacher with the same clips and noise draws
as the smoothing calibration. The pick is written to `OUTPUT/act8_layers.json`, so a resumed run and
every process of a multi-process one train the same layers with 8-bit inputs without measuring again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_file
from ..config import QVGenConfig
from ..eval.sensitivity import ACT8_BITS, describe, layer_sensitivity, most_sensitive
from .trainer import CALIBRATION_CLIPS, TrainOptions, make_batch, smoothing_calibration

ACT8_FILE = "act8_layers.json"
log = logging.getLogger("qvgen.train")


def measure_act8_layers(
    teacher: nn.Module, config: QVGenConfig, dataset, objective, opts: TrainOptions, n: int, device: str | None
) -> Path:
    """Measure (unless an earlier run's pick for the same N is in the run folder) and write the pick."""
    path = opts.output_dir / ACT8_FILE
    if path.is_file() and _read(path, n):
        return path
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    clips = list(range(min(CALIBRATION_CLIPS, len(dataset))))
    inputs = [make_batch(dataset, objective, opts, -1, clips, range(j, j + 1), dev).inputs for j in clips]
    home = next(teacher.parameters()).device
    use_bf16 = opts.mixed_precision == "bf16" or (opts.mixed_precision == "auto" and dev.type == "cuda")
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
        calibrate = smoothing_calibration(dataset, objective, opts, dev)
        sens = layer_sensitivity(teacher.to(dev), config, inputs, calibrate=calibrate, progress=opts.progress)
    teacher.to(home)
    record = {"auto": n, "picked": most_sensitive(sens, n), "sensitivity": sens}
    opts.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_file(path, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    return path


def with_act8_layers(config: QVGenConfig, path: Path, n: int) -> QVGenConfig:
    """`config` with 8-bit inputs on the layers picked in `path`; prints which and their sensitivity."""
    picked = _read(path, n)
    line = describe(picked)
    log.info("%s", line)
    print(line)
    return dataclasses.replace(config, layer_act_bits={**config.layer_act_bits, **dict.fromkeys(picked, ACT8_BITS)})


def _read(path: Path, n: int) -> dict[str, float]:
    try:
        record = json.loads(path.read_text())
        auto, picked = record["auto"], record["picked"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable --act8-layers pick ({e}); delete it to measure again") from None
    if auto != n:
        raise ValueError(
            f"{path}: the run picked --act8-layers auto:{auto}, this command asks auto:{n}; "
            "use another --output, or delete the file (and the run's checkpoints) to measure again"
        )
    return picked
