"""QAT distillation: `python -m qvgen.train` (CLI in `cli.py`), the loop in `trainer.py`."""

from .objectives import CogVideoXObjective, FlowMatchingObjective
from .trainer import LatentDataset, TrainOptions, TrainResult, build_student, train

__all__ = [
    "CogVideoXObjective",
    "FlowMatchingObjective",
    "LatentDataset",
    "TrainOptions",
    "TrainResult",
    "build_student",
    "train",
]
