"""Time per step and peak memory of QVGen QAT against full-precision fine-tuning and LoRA-based QAT.

Every method runs the same distillation step through `qvgen.train.train` (frozen teacher forward,
student forward and backward, gradient clipping, AdamW) on the same model, batch and clip size;
only the student differs:

  fp      full-precision fine-tuning: every weight trainable, no quantization (the baseline, 1.00×)
  lora    LoRA-based QAT: W4A4 fake-quantized weights and quantizers frozen, a rank-r LoRA branch trained
  qvgen   QVGen QAT: weights, quantizer scales and clipping trained, plus Φ at its initial rank
          (the first, most expensive phase of the rank decay)
  qat     QVGen once Φ has decayed to rank 0: plain W4A4 QAT (optional)

Each method runs in a process of its own (forked from a server that did the imports once), so its
peak memory is its own: on CUDA `torch.cuda.max_memory_allocated`, on CPU the peak resident set
size (`ru_maxrss`), both minus the memory in use once the teacher and the data are loaded. Time per
step is the median over the measured steps after warm-up (wall clock, or `--clock cpu`: the
process's CPU time, steady on a machine shared with other work).

Examples:
  python -m qvgen.bench train                                    # CPU, tiny Wan, < 1 min
  python -m qvgen.bench train --preset wan-1.3b --layers 8 --frames 17 --device cuda
  python -m qvgen.bench train --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

HELP = "training step time and memory: QVGen QAT vs FP fine-tuning vs LoRA-based QAT"

# WanTransformer3DModel configurations; the Wan presets are the released models' shapes (random weights)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16, text_dim=64,
                 freq_dim=64, ffn_dim=512, num_layers=2, rope_max_seq_len=64),
    "small": dict(num_attention_heads=4, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=512,
                  freq_dim=128, ffn_dim=2048, num_layers=4, rope_max_seq_len=256),
    "wan-1.3b": dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                     freq_dim=256, ffn_dim=8960, num_layers=30),
    "wan-14b": dict(num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                    freq_dim=256, ffn_dim=13824, num_layers=40),
}  # fmt: skip
# default clip per preset: (frames, height, width, text tokens); Wan: 81 × 480 × 832 is the paper's
CLIPS = {
    "tiny": (9, 128, 128, 32),
    "small": (17, 256, 256, 64),
    "wan-1.3b": (81, 480, 832, 512),
    "wan-14b": (81, 480, 832, 512),
}
METHODS = {
    "fp": "FP fine-tuning (baseline)",
    "lora": "LoRA-based QAT",
    "qvgen": "QVGen QAT",
    "qat": "QVGen after decay (plain QAT)",
}


class _Done(Exception):
    """Raised from the step callback once the measured steps are in (skips the final checkpoint)."""


@dataclass
class Result:
    method: str
    label: str
    trainable_params: int
    sec_per_step: float  # median over the measured steps
    best_sec: float  # fastest measured step (robust to other load on the machine)
    peak_bytes: float
    estimate_bytes: float
    steps: list[float]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape (random weights)")
    p.add_argument("--model", help="instead of --preset: a diffusers Wan pipeline or transformer (folder or Hub id)")
    p.add_argument("--layers", type=int, help="override the number of transformer blocks (a quicker large model)")
    p.add_argument("--frames", type=int, help="video frames (latent: (frames - 1) / 4 + 1); preset default")
    p.add_argument("--height", type=int, help="video height in pixels (latent: / 8)")
    p.add_argument("--width", type=int, help="video width in pixels (latent: / 8)")
    p.add_argument("--text-len", type=int, help="text tokens")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--methods", default="fp,lora,qvgen", help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--weight-bits", type=int, default=4)
    p.add_argument("--act-bits", type=int, default=4)
    p.add_argument("--rank", type=int, default=32, help="Φ's initial rank, and the LoRA rank")
    p.add_argument("--warmup", type=int, default=2, help="steps not measured")
    p.add_argument("--steps", type=int, default=5, help="measured steps")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--mixed-precision", choices=["auto", "bf16", "no"], default="auto", help="auto: bf16 on CUDA")
    p.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA"
    )
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: the process's CPU time per step (CPU only; steady on a machine shared with other work)",
    )
    p.add_argument("--threads", type=int, help="torch threads of each measured process (CPU)")
    p.add_argument("--json", type=Path, help="also write the results here")


# ---- one method, in its own process ---------------------------------------------------------------
def _teacher(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model:
        sub = "transformer" if (Path(args.model) / "transformer").is_dir() or not Path(args.model).exists() else None
        model = WanTransformer3DModel.from_pretrained(args.model, subfolder=sub, torch_dtype=dtype)
    else:
        cfg = dict(PRESETS[args.preset])
        if args.layers:
            cfg["num_layers"] = args.layers
        torch.manual_seed(0)
        with torch.device(device):
            model = WanTransformer3DModel(**cfg)
        if dtype != torch.float32:
            model.to(dtype)  # as `from_pretrained(torch_dtype=bf16)` would, minus its fp32 exceptions
    return model.to(device).eval().requires_grad_(False)


def _clip_shape(args: argparse.Namespace, teacher) -> tuple[tuple[int, ...], tuple[int, int]]:
    frames, height, width, text_len = CLIPS[args.preset if not args.model else "wan-1.3b"]
    frames, height, width = args.frames or frames, args.height or height, args.width or width
    latents = (teacher.config.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8)
    return latents, (args.text_len or text_len, teacher.config.text_dim)


@torch.no_grad()
def _quick_init(student: torch.nn.Module) -> None:
    """Min/max weight scales and a small random Φ: a step costs the same as after the real initialisation
    (clip search, SVD), which takes longer than the steps measured here."""
    from qvgen.layers import QVGenLinear
    from qvgen.quantizers import SCALE_MIN

    g = torch.Generator().manual_seed(0)
    for layer in student.modules():
        if isinstance(layer, QVGenLinear):
            w, wq = layer.effective_weight().float(), layer.weight_quantizer
            lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
            wq.scale.copy_(((hi - lo) / (2**wq.bits - 1)).clamp(min=SCALE_MIN))
            wq.zero.copy_(-lo / wq.scale)
            for phi in (layer.phi_down, layer.phi_up):
                if phi is not None:
                    phi.copy_(torch.randn(phi.shape, generator=g) * 1e-3)


def _student(method: str, teacher, config):
    from qvgen.train import build_student

    if method == "fp":
        student = copy.deepcopy(teacher).float()
        return student.train().requires_grad_(True)
    student, _ = build_student(teacher, config, init=False, progress=False)
    _quick_init(student)
    if method == "lora":  # frozen quantized weights and quantizers; Φ's factors are the LoRA
        for name, p in student.named_parameters():
            p.requires_grad_(name.endswith(("phi_down", "phi_up")))
    return student


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def measure(method: str, args: argparse.Namespace) -> Result:
    """One method's training steps in this process."""
    from qvgen import QVGenConfig
    from qvgen.train import LatentDataset, TrainOptions, train
    from qvgen.train.distributed import ParallelPlan
    from qvgen.train.memory import estimate_memory

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    teacher = _teacher(args, device)
    lat_shape, text_shape = _clip_shape(args, teacher)
    g = torch.Generator().manual_seed(0)
    n = max(2, args.batch_size)
    ds = LatentDataset(
        [torch.randn(lat_shape, generator=g) for _ in range(n)],
        [torch.randn(text_shape, generator=g) for _ in range(n)],
        torch.zeros(text_shape),
    )
    rank = 0 if method in ("fp", "qat") else args.rank
    config = QVGenConfig(weight_bits=args.weight_bits, act_bits=args.act_bits or None, rank=rank, phase_steps=10**9)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss()
    student = _student(method, teacher, config)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    total = args.warmup + args.steps
    peak: list[float] = []
    cpu_clock = [time.process_time()]

    def on_step(step: int, rec: dict) -> None:
        now = time.process_time()
        rec["cpu_sec"], cpu_clock[0] = now - cpu_clock[0], now  # includes the few ms between steps
        if step + 1 == total:
            if cuda:
                torch.cuda.synchronize()
            peak.append((torch.cuda.max_memory_allocated() if cuda else _peak_rss()) - base)
            raise _Done

    with tempfile.TemporaryDirectory() as tmp:
        opts = TrainOptions(
            output_dir=Path(tmp),
            steps=total,
            batch_size=args.batch_size,
            warmup_steps=1,
            lr=1e-5,
            progress=False,
            resume=False,
            checkpoint_every=10**9,
            mixed_precision=args.mixed_precision,
            gradient_checkpointing=args.gradient_checkpointing,
            parallel="none",
        )
        history: list[dict] = []
        try:
            train(teacher, config, ds, opts, student=student, device=device, on_step=lambda s, r: (
                history.append(r), on_step(s, r)))  # fmt: skip
        except _Done:
            pass
    plan = ParallelPlan()
    checkpointing = bool(args.gradient_checkpointing if args.gradient_checkpointing is not None else cuda)
    est = estimate_memory(student, teacher, plan, 1, checkpointing)
    states = sum(b for what, b, _ in est.rows if not what.startswith("teacher"))  # the teacher is in the baseline
    steps = [r["cpu_sec" if args.clock == "cpu" else "sec"] for r in history[args.warmup :]]
    return Result(method, METHODS[method], trainable, statistics.median(steps), min(steps), peak[0], states, steps)


def _child(method: str, args: argparse.Namespace, out: str) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    Path(out).write_text(json.dumps(asdict(measure(method, args))))


def _run_isolated(method: str, args: argparse.Namespace) -> Result:
    """`measure` in a process of its own. On Linux it is forked from a clean server process that has
    done the imports once (forking the caller itself can deadlock on its thread pools, and a forked
    child cannot use CUDA once the parent has touched it); elsewhere it is spawned."""
    if sys.platform.startswith("linux"):
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "diffusers", "qvgen.train", "qvgen.bench.train"])
    else:
        ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        proc = ctx.Process(target=_child, args=(method, args, out))
        proc.start()
        proc.join()
        if proc.exitcode != 0 or not os.path.exists(out):
            raise RuntimeError(f"benchmark of {method!r} failed (exit code {proc.exitcode}); see the error above")
        return Result(**json.loads(Path(out).read_text()))


# ---- report --------------------------------------------------------------------------------------
def _gib(b: float) -> str:
    return f"{b / 2**30:.3f} GiB" if b >= 2**27 else f"{b / 2**20:.1f} MiB"


def table(results: list[Result], clock: str = "wall") -> str:
    """Markdown table; ratios against the first row (the FP fine-tuning baseline when measured)."""
    base = results[0]
    unit = "s" if clock == "wall" else "CPU s"
    rows = [
        f"| method | trainable params | time / step ({unit}) | × {base.method} | peak memory | × {base.method} "
        "| estimated states |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in results:
        rows.append(
            f"| {r.label} | {r.trainable_params:,} | {r.sec_per_step:.4f} | {r.sec_per_step / base.sec_per_step:.2f} "
            f"| {_gib(r.peak_bytes)} | {r.peak_bytes / base.peak_bytes:.2f} | {_gib(r.estimate_bytes)} |"
        )
    return "\n".join(rows)


def describe(args: argparse.Namespace) -> dict[str, Any]:
    import qvgen

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine()
    cuda = device.startswith("cuda")
    return {
        "device": f"{device} ({name})",
        "model": args.model or args.preset + (f", {args.layers} blocks" if args.layers else ""),
        "batch": args.batch_size,
        "precision": args.mixed_precision if args.mixed_precision != "auto" else ("bf16" if cuda else "fp32"),
        "bits": f"W{args.weight_bits}A{args.act_bits or 16}",
        "rank": args.rank,
        "memory": "CUDA max_memory_allocated" if cuda else "peak RSS (ru_maxrss)",
        "clock": "process CPU time" if args.clock == "cpu" else "wall",
        "threads": args.threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "qvgen": getattr(qvgen, "__version__", "?"),
    }


def run(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        print(f"error: --methods: unknown {unknown}; expected names from {list(METHODS)}")
        return 2
    if args.clock == "cpu" and (args.device or "").startswith("cuda"):
        print("error: --clock cpu measures CPU time; time GPU steps with the default wall clock")
        return 2
    info = describe(args)
    print("QVGen training benchmark: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    results = []
    for m in methods:
        results.append(_run_isolated(m, args))
        r = results[-1]
        line = f"  {r.label}: {r.sec_per_step:.4f} s/step (best {r.best_sec:.4f}), peak {_gib(r.peak_bytes)}"
        print(line, flush=True)
    print()
    print(table(results, args.clock))
    print(
        f"\nPeak memory: {info['memory']} over building the student and the steps, minus the memory in use "
        "with the teacher and the data loaded. Estimated states: the trainer's estimate of the student's "
        "weights, gradients and AdamW moments (activations not included)."
    )
    if args.json:
        args.json.write_text(json.dumps({"setup": info, "results": [asdict(r) for r in results]}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m qvgen.bench train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
