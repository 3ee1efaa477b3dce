"""The demo's columns for ComfyUI's other native formats (`--schemes`), next to the int4 per-token ones.

Each scheme is one row of `SCHEME_RUNS`: the config fields that make it, and the kept Φ ranks it
is measured at. Every (scheme, kept rank) gives three students with equal step budgets: PTQ
(round to nearest at conversion, no training), QAT (trained with Φ fixed at the kept rank) and
QVGen (Φ from `--rank`, decayed to the kept rank). A kept rank of 0 is the plain format.
"""

from __future__ import annotations

import argparse

from ..config import QVGenConfig
from ..decay import RankDecaySchedule

# scheme → (short label, config fields, kept ranks: the --svdquant-ranks option or (0,))
SCHEME_RUNS: dict[str, tuple[str, dict, str | None]] = {
    "nvfp4": ("nvfp4", dict(input_transform="none"), None),
    "svdquant_w4a4": ("svdquant", dict(act_bits=4, input_transform="smooth", n_buckets=1), "svdquant_ranks"),
    "w4a8_int8": ("w4a8", dict(act_bits=8, input_transform="none", n_buckets=1), None),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--schemes",
        type=lambda v: [s for s in v.split(",") if s],
        default=[],
        help=f"ComfyUI-native schemes to compare as well, comma-separated: {','.join(SCHEME_RUNS)}",
    )
    p.add_argument(
        "--svdquant-ranks",
        type=lambda v: [int(r) for r in v.split(",") if r],
        default=[0, 8, 16, 32],
        help="Φ ranks kept as SVDQuant's low-rank branch (each gets PTQ, QAT and QVGen students)",
    )


def scheme_configs(args: argparse.Namespace, base: dict) -> dict[str, QVGenConfig]:
    """Column name → config for every requested scheme, kept rank and method."""
    out: dict[str, QVGenConfig] = {}
    for scheme in args.schemes:
        if scheme not in SCHEME_RUNS:
            raise SystemExit(f"--schemes: unknown scheme {scheme!r}; expected some of {list(SCHEME_RUNS)}")
        label, fields, ranks_arg = SCHEME_RUNS[scheme]
        train_transform = fields["input_transform"] != "none" and args.train_transform
        cfg = {**base, **fields, "scheme": scheme, "train_transform": train_transform}
        for r in getattr(args, ranks_arg) if ranks_arg else [0]:
            tag = f"{label} r{r}" if ranks_arg else label
            out[f"PTQ {tag}"] = QVGenConfig(**cfg, rank=r, final_rank=r)
            out[f"QAT {tag}"] = QVGenConfig(**cfg, rank=r, final_rank=r)
            if r < args.rank:  # at r = --rank nothing decays: QVGen would be the QAT student
                phases = len(RankDecaySchedule(args.rank, 1, 0.5, r).phase_ranks) or 1
                out[f"QVGen {tag}"] = QVGenConfig(
                    **cfg, rank=args.rank, final_rank=r, phase_steps=max(1, args.steps // phases)
                )
    return out
