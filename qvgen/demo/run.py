"""`python -m qvgen.demo`: the embedded default — W4A4 by PTQ, plain QAT and QVGen, side by side.

Everything runs on CPU in a few minutes with no downloads: the teacher is a tiny Wan-architecture
transformer (committed in `qvgen/demo/assets/`) trained on generated clips of moving shapes, and
works directly on pixels (no VAE). With equal step budgets the demo makes W4A4 students by
(a) round-to-nearest PTQ, (b) plain QAT without Φ, (c) QVGen (Φ decayed to rank 0); exports and
reloads the QVGen checkpoint; samples the same prompts and seeds from all four; and writes
`comparison.gif`, `loss_curves.png` and `metrics.json` to the output folder.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fnmatch
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..api import load_quantized_model, save_quantized
from ..config import QVGenConfig
from ..decay import RankDecaySchedule
from ..eval.sensitivity import act8_mac_fraction, describe, layer_sensitivity, most_sensitive, parse_act8_layers
from ..quantizers import ZERO_POINT_GRADS
from ..surgery import convert_model
from ..train import LatentDataset, TrainOptions, train
from ..transforms import uses_rotation, uses_smoothing
from . import schemes, shapes, teacher, text
from .evaluate import EvalSet, mse, predictions, velocity_errors
from .provenance import environment
from .report import plot_losses, write_comparison_gif
from .summary import aggregate, table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qvgen.demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", type=Path, default=Path("demo-output"), help="folder for the pictures and metrics")
    p.add_argument("--steps", type=int, default=120, help="training steps per QAT method (equal budgets)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4, help="higher than the paper's 3e-5: tiny model, few steps")
    p.add_argument("--rank", type=int, default=32, help="QVGen's initial Φ rank")
    p.add_argument("--train-clips", type=int, default=256)
    p.add_argument("--eval-clips", type=int, default=16, help="held-out clips for the velocity error")
    p.add_argument("--prompts", type=int, default=4, help="prompts sampled for the animation")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--weight-bits", type=int, default=4)
    p.add_argument("--act-bits", type=int, default=4)
    p.add_argument(
        "--act-group-size",
        type=int,
        default=None,
        help="activation scales per group of this many input features (default: per token); README, "
        "'Per-group activation quantization'",
    )
    p.add_argument(
        "--transforms",
        type=lambda v: v.split(","),
        default=["none", "smooth"],
        help="input transforms to compare, comma-separated: none,hadamard,smooth,smooth_hadamard "
        "(none always runs; smooth measured best, see README)",
    )
    p.add_argument(
        "--train-transform",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the smoothing scales during QAT",
    )
    p.add_argument(
        "--smooth-alpha",
        type=float,
        default=QVGenConfig.smooth_alpha,
        help="SmoothQuant migration strength for the smooth transforms",
    )
    p.add_argument(
        "--seeds",
        type=_int_list,
        default=[0],
        help="comma-separated seeds (data, noise, batch order); with several, each figure is reported as "
        "mean ± standard deviation, and the pictures come from the first seed",
    )
    p.add_argument(
        "--zero-point-grad",
        choices=ZERO_POINT_GRADS,
        default=QVGenConfig.zero_point_grad,
        help="clip logits' gradient through the activation zero point's rounding (docs/training.md)",
    )
    p.add_argument(
        "--keep",
        type=lambda v: [x for x in v.split(",") if x],
        default=[],
        help="layers left in full precision (fnmatch patterns): per-layer mixed precision, e.g. proj_out, "
        "the layer `python -m qvgen.eval --demo` finds most sensitive",
    )
    p.add_argument(
        "--act8-layers",
        type=parse_act8_layers,
        default=None,
        help="8-bit inputs on some layers (per-layer mixed precision): auto:N picks the N layers whose RTN "
        "quantization alone costs the most on the calibration clips, or comma-separated fnmatch patterns",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the training runs already in --output/runs (same settings): a finished student is loaded, "
        "not retrained, so an interrupted multi-seed run is completed by running the same command again",
    )
    p.add_argument(
        "--smooth-buckets",
        type=_int_list,
        default=[],
        help="also train QAT and QVGen with smoothing scales per this many groups of timestep buckets, for each "
        "smooth transform (comma-separated, e.g. 2,5; README, 'Timestep-dependent smoothing and learned rotations')",
    )
    p.add_argument(
        "--learned-rotation",
        type=_int_list,
        default=[],
        help="also train QAT and QVGen with a learned block-diagonal rotation of this block size after the "
        "Hadamard, for each rotating transform (comma-separated, e.g. 32,128)",
    )
    p.add_argument(
        "--only",
        type=lambda v: [x for x in v.split(",") if x],
        default=[],
        help="run only the methods whose column name matches one of these fnmatch patterns (e.g. '*+tb*'); PTQ, "
        "QAT and QVGen (the ratios' baselines and the pictures) always run: to add rows to an earlier run in less time",
    )
    schemes.add_arguments(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _int_list(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not out or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers, got {value!r}")
    return out


def _data(n: int, seed: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    captions = shapes.sample_captions(n, seed=seed)
    clips = torch.stack([shapes.make_clip(c, seed=seed * 100_003 + i) for i, c in enumerate(captions)])
    return captions, clips, text.encode_prompts(captions)


def _configs(args: argparse.Namespace) -> dict[str, QVGenConfig]:
    """One config per (method, transform); names are "PTQ", "QAT", "QVGen", then "QVGen+hadamard", …"""
    phases = len(RankDecaySchedule(args.rank, 1).phase_ranks) or 1
    out = {}
    # the untransformed methods always run: the "× PTQ" and "× QVGen" ratios are against them
    for transform in dict.fromkeys(["none", *args.transforms]):
        base = dict(
            weight_bits=args.weight_bits,
            act_bits=args.act_bits or None,
            n_buckets=10,
            input_transform=transform,
            train_transform=transform != "none" and args.train_transform,
            smooth_alpha=args.smooth_alpha,
            zero_point_grad=args.zero_point_grad,
            act_group_size=args.act_group_size,
            modules_to_not_convert=list(args.keep),
        )
        suffix = "" if transform == "none" else f"+{transform}"
        for tag, extra in _learned_variants(args, transform):  # "" first: the plain transform
            if "learned_rotation" not in extra:  # a learned rotation starts at the plain one: PTQ is the same
                out[f"PTQ{suffix}{tag}"] = QVGenConfig(rank=0, **base, **extra)
            out[f"QAT{suffix}{tag}"] = QVGenConfig(rank=0, **base, **extra)
            out[f"QVGen{suffix}{tag}"] = QVGenConfig(
                rank=args.rank, phase_steps=max(1, args.steps // phases), **base, **extra
            )
    out.update(schemes.scheme_configs(args, base))  # --schemes: ComfyUI's other native formats
    if args.only:
        keep = ["PTQ", "QAT", "QVGen", *args.only]
        out = {name: c for name, c in out.items() if any(fnmatch.fnmatchcase(name, p) for p in keep)}
    return out


def _learned_variants(args: argparse.Namespace, transform: str) -> list[tuple[str, dict]]:
    """(name tag, config fields) of the trained variants of `transform`: itself, then the learned transforms
    (`--smooth-buckets`, `--learned-rotation`) it admits."""
    out: list[tuple[str, dict]] = [("", {})]
    if uses_smoothing(transform):
        out += [(f"+tb{g}", {"smooth_buckets": g}) for g in args.smooth_buckets if g > 1]
    if uses_rotation(transform):
        out += [(f"+rot{b}", {"learned_rotation": b}) for b in args.learned_rotation if b > 0]
    return out


def _calibration_inputs(dataset: LatentDataset) -> list[dict[str, torch.Tensor]]:
    """The first 8 training clips noised at σ = 0.2, 0.5, 0.8: smoothing calibration and layer sensitivity."""
    batch = torch.stack(dataset.latents[:8]), torch.stack(dataset.texts[:8])
    out = []
    for sigma in (0.2, 0.5, 0.8):
        noise = torch.randn(batch[0].shape, generator=torch.Generator().manual_seed(7))
        out.append(
            dict(
                hidden_states=(1 - sigma) * batch[0] + sigma * noise,
                timestep=torch.full((len(batch[0]),), sigma * 1000),
                encoder_hidden_states=batch[1],
            )
        )
    return out


def _calibrate(dataset: LatentDataset):
    inputs = _calibration_inputs(dataset)

    def calibrate(m):
        for x in inputs:
            m(**x)

    return calibrate


def _student(fp, cfg: QVGenConfig, dataset: LatentDataset, args: argparse.Namespace):
    """A converted copy of the teacher; smoothing and static input scales calibrated on a few training clips."""
    model = copy.deepcopy(fp).float().requires_grad_(True)
    calibrate = _calibrate(dataset)
    convert_model(model, cfg, progress=False, calibrate=calibrate)
    with torch.no_grad():
        calibrate(model)  # static input scales (nvfp4) are set by the first inputs a layer sees
    return model


def _with_act8(fp, configs: dict[str, QVGenConfig], dataset: LatentDataset, args: argparse.Namespace):
    """`--act8-layers` applied to the qvgen-scheme configs; with auto:N, the N layers measured most
    sensitive for each input transform (RTN PTQ of that config, the calibration clips). Returns the
    configs and {transform: {layer: sensitivity}} of the picks."""
    spec = args.act8_layers
    if spec is None:
        return configs, {}
    picks: dict[str, dict[str, float]] = {}
    out = dict(configs)
    for name, cfg in configs.items():
        if cfg.scheme != "qvgen":
            continue
        if spec.auto and cfg.input_transform not in picks:
            sens = layer_sensitivity(fp, cfg, _calibration_inputs(dataset), calibrate=_calibrate(dataset))
            picks[cfg.input_transform] = most_sensitive(sens, spec.auto)
            print(f"--act8-layers {cfg.input_transform}: {describe(picks[cfg.input_transform])}")
        layers = dict.fromkeys(picks[cfg.input_transform], 8) if spec.auto else spec.layer_act_bits()
        out[name] = dataclasses.replace(cfg, layer_act_bits=layers)
    return out, picks


def _file_mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def _train_students(fp, configs, dataset, args, seed: int, out: Path):
    students, histories, timings = {}, {}, {}
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        student = _student(fp, cfg, dataset, args)
        if name.startswith("PTQ"):
            students[name] = student.eval()
        else:
            opts = TrainOptions(
                output_dir=out / "runs" / f"seed{seed}" / name,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=seed,
                progress=not args.no_progress,
                resume=args.resume,
                checkpoint_every=args.steps,
            )
            result = train(fp, cfg, dataset, opts, student=student, device="cpu")
            students[name], histories[name] = result.student, result.history
        timings[name] = round(time.perf_counter() - t0, 1)
    return students, histories, timings


def _checkpoint_metrics(student, config: QVGenConfig, fp, ev: EvalSet, reference, out: Path) -> tuple[dict, Any]:
    """Export → reload the QVGen checkpoint; its size and how closely the packed model follows the student."""
    # fp32 for the few tensors kept in full precision: the reload must reproduce the fake-quant model
    ckpt = save_quantized(student, config, out / "qvgen-demo-w4a4.safetensors", dtype=torch.float32)
    packed = load_quantized_model(ckpt)
    packed_pred = predictions(packed, ev)
    fake_pred = predictions(student, ev)
    bf16 = out / "teacher-bf16.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in fp.state_dict().items()}, str(bf16))
    metrics = {
        "file": ckpt.name,
        "size_mb": round(_file_mb(ckpt), 3),
        "bf16_size_mb": round(_file_mb(bf16), 3),
        "size_ratio_vs_bf16": round(_file_mb(ckpt) / _file_mb(bf16), 3),
        # relative L2 gap: a 1e-6 input difference can flip one 4-bit rounding, so max |Δ| is not meaningful
        "packed_vs_fake_quant_rel_err": float((packed_pred - fake_pred).norm() / fake_pred.norm()),
        "packed_velocity_mse": mse(packed_pred, reference),
    }
    bf16.unlink()
    return metrics, packed


def run_seed(fp, args: argparse.Namespace, seed: int, pictures: bool) -> dict[str, Any]:
    """One seed: data, students, velocity errors; with `pictures`, also the export check, samples and plots."""
    out = args.output
    _, train_clips, train_text = _data(args.train_clips, seed + 1)
    empty = text.encode_prompts([""])[0]
    dataset = LatentDataset(list(train_clips), list(train_text), empty)
    _, eval_clips, eval_text = _data(args.eval_clips, seed + 2)
    ev = EvalSet.build(eval_clips, eval_text)
    reference = predictions(fp, ev)
    configs, act8_picks = _with_act8(fp, _configs(args), dataset, args)
    students, histories, timings = _train_students(fp, configs, dataset, args, seed, out)

    metrics: dict[str, Any] = {"methods": {}}
    for name, model in students.items():
        m = velocity_errors(model, reference, ev)
        m["train_seconds"] = timings[name]
        if name in histories:
            m["phi_rank_over_training"] = _rank_runs(histories[name])
            m["final_train_loss"] = histories[name][-1]["loss"]
        metrics["methods"][name] = m
    if args.act8_layers is not None:
        x = _calibration_inputs(dataset)[0]
        metrics["act8"] = {
            "picked": act8_picks,
            "mac_fraction": {n: act8_mac_fraction(students[n], x) for n, c in configs.items() if c.layer_act_bits},
        }
    ptq = metrics["methods"]["PTQ"]["velocity_mse"]
    qvgen = metrics["methods"]["QVGen"]["velocity_mse"]
    for m in metrics["methods"].values():
        m["velocity_mse_vs_ptq"] = round(m["velocity_mse"] / ptq, 4)
        m["velocity_mse_vs_qvgen"] = round(m["velocity_mse"] / qvgen, 4)
    if pictures:
        metrics["checkpoint"], packed = _checkpoint_metrics(students["QVGen"], configs["QVGen"], fp, ev, reference, out)
        columns, sample_err = _samples(
            fp, {"PTQ": students["PTQ"], "QAT": students["QAT"], "QVGen": packed}, seed, args
        )
        for name, err in sample_err.items():
            metrics["methods"][name]["sample_mse"] = err
        write_comparison_gif(out / "comparison.gif", columns)
        plot_losses(out / "loss_curves.png", histories)
    return metrics


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    fp = teacher.load_teacher().eval()
    per_seed = {str(seed): run_seed(fp, args, seed, pictures=i == 0) for i, seed in enumerate(args.seeds)}
    first = per_seed[str(args.seeds[0])]
    metrics: dict[str, Any] = {
        "methods": aggregate(per_seed),
        "checkpoint": first["checkpoint"],
        "seeds": args.seeds,
        "per_seed": {s: m["methods"] for s, m in per_seed.items()},
        **({"act8_layers": {s: m["act8"] for s, m in per_seed.items()}} if args.act8_layers is not None else {}),
        "settings": {k: _jsonable(v) for k, v in vars(args).items()},
        "environment": environment(sys.argv[1:] if argv is None else argv),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    (args.output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(summary(metrics))
    return metrics


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _rank_runs(history: list[dict]) -> list[list[int]]:
    """Φ's rank over training as [first_step, rank] at each change (compact)."""
    runs, last = [], None
    for r in history:
        if r["rank"] != last:
            runs.append([r["step"], r["rank"]])
            last = r["rank"]
    return runs


@torch.no_grad()
def _samples(fp, models: dict, seed: int, args: argparse.Namespace):
    captions = shapes.sample_captions(args.prompts, seed=seed + 3)
    emb = text.encode_prompts(captions)
    columns: dict[str, list[torch.Tensor]] = {"FP": []}
    columns.update({k: [] for k in models})
    errors = {k: 0.0 for k in models}
    for i in range(len(captions)):
        ref = teacher.sample(fp, emb[i : i + 1], seed=seed + i, num_steps=args.sample_steps)[0]
        columns["FP"].append(ref)
        for name, model in models.items():
            vid = teacher.sample(model, emb[i : i + 1], seed=seed + i, num_steps=args.sample_steps)[0]
            columns[name].append(vid)
            errors[name] += mse(vid, ref) / len(captions)
    return columns, errors


def summary(metrics: dict[str, Any]) -> str:
    seeds = metrics["seeds"]
    spread = f" (mean ± std over seeds {seeds})" if len(seeds) > 1 else f" (seed {seeds[0]})"
    c = metrics["checkpoint"]
    return (
        f"\nVelocity MSE against the teacher{spread}\n{table(metrics)}\n"
        f"\nQVGen checkpoint: {c['size_mb']:.2f} MB vs {c['bf16_size_mb']:.2f} MB bf16 "
        f"({c['size_ratio_vs_bf16']:.2f}×); packed vs fake-quant relative error "
        f"{c['packed_vs_fake_quant_rel_err']:.2e}; total {metrics['total_seconds']} s"
    )


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv), argv)
    return 0
