"""`python -m qvgen.bench kernels`: the command line of the layer benchmark (qvgen.bench.kernels)
and of its device-time records (qvgen.bench.kernel_records)."""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict

import torch

from . import kernels
from .kernel_records import run_device_time
from .kernels import CPU_TOKENS, GPU_TOKENS, MODELS, Row, bench_case, layer_shapes, machine, markdown

HELP = kernels.HELP
DESCRIPTION = kernels.__doc__


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--models", default="1.3b", help=f"comma-separated Wan 2.1 sizes: {', '.join(MODELS)}")
    p.add_argument("--shapes", default=None, help="custom KxN list, e.g. 1536x1536,1536x8960 (replaces --models)")
    p.add_argument(
        "--tokens", type=_ints, default=None,
        help=f"token counts M (default GPU: {','.join(map(str, GPU_TOKENS))}; CPU: {','.join(map(str, CPU_TOKENS))})",
    )  # fmt: skip
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=lambda v: None if v.lower() in ("none", "16") else int(v), default=4,
                   help="activation bits, or none for weight-only")  # fmt: skip
    p.add_argument("--rank", type=int, default=0, help="Φ rank (0: the finished QVGen model)")
    p.add_argument("--transform", choices=("none", "hadamard", "smooth", "smooth_hadamard"), default="none",
                   help="input transform in the activation quantizer; also times the layer without it")  # fmt: skip
    p.add_argument("--act-group-size", type=int, default=None,
                   help="also time activation scales per group of this many features (cpu/torch backends)")  # fmt: skip
    p.add_argument("--vs-a-bits", type=int, default=None,
                   help="also time the layer with this many activation bits (e.g. 8); ratio to --a-bits")  # fmt: skip
    p.add_argument("--widened", action="store_true", help="also time widened weights (one code per byte)")
    p.add_argument("--backend", default="auto", help="qvgen_kernels backend: auto, triton, cpu, torch")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed runs per measurement")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--stat", choices=("median", "min"), default="median", help="statistic over the timed runs")
    p.add_argument("--no-bf16", action="store_true", help="CPU: skip the bf16 baseline column")
    p.add_argument("--no-comfy", action="store_true", help="skip comfy-kitchen even if importable")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument(
        "--device-time",
        action="store_true",
        help="issue #13 records: device time (CUDA graphs, L2 flushed), host overhead, quant/GEMM "
        "split, vendor ceilings, block pairs; CPU: wall time. Writes docs/bench/kernels-<gpu>.json",
    )
    p.add_argument("--out", default=None, metavar="PATH", help="--device-time: where to write the records")
    p.add_argument("--no-blocks", action="store_true", help="--device-time: skip the block pairs")
    p.add_argument("--no-ceilings", action="store_true", help="--device-time: skip the vendor GEMM ceilings")
    p.add_argument(
        "--budget-s", type=float, default=None, help="--device-time: start no new row after this many seconds"
    )


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    gpu = device.type == "cuda"
    tokens = args.tokens or list(GPU_TOKENS if gpu else CPU_TOKENS)
    if args.min_time is None:
        args.min_time = 0.2 if gpu else 0.3
    if args.shapes:
        cases = [("custom", f"{k}x{n}", int(k), int(n)) for k, n in (s.split("x") for s in args.shapes.split(","))]
    else:
        cases = [(mdl, name, k, n) for mdl in args.models.split(",") for name, k, n in layer_shapes(mdl.strip())]

    from qvgen.kernels_import import qvgen_kernels as qk

    backend = qk.resolve_backend(args.backend, device)
    if args.device_time:
        return run_device_time(args, device, cases, tokens, backend)
    label = f"W{args.w_bits}A{args.a_bits or 16}" + (f"+Φ{args.rank}" if args.rank else "")
    label += (f"+{args.transform}" if args.transform != "none" else "") + f" ({backend})"
    info = machine(device)
    print(f"# qvgen kernels benchmark — {info.get('gpu', info['cpu'])}, torch {info['torch']}, "
          f"{info['cpu_threads']} CPU threads, backend {backend}")  # fmt: skip
    rows: list[Row] = []
    t0 = time.perf_counter()
    for model, layer, k, n in cases:
        for m in tokens:
            rows.append(bench_case(model, layer, m, k, n, args, device))
            r = rows[-1]
            cost = f", transform {r.transform_pct:.1f}% of the layer" if r.transform_pct is not None else ""
            if r.act_group_ratio is not None:
                cost += f", groups of {args.act_group_size}: {r.act_group_ratio:.2f}× per token"
            if r.vs_a_bits_ratio is not None:
                cost += f", A{args.vs_a_bits}: {r.vs_a_bits_ratio:.2f}× A{args.a_bits}"
            print(f"  {model} {layer} M={m} K={k} N={n}: {r.baseline_ms:.3f} ms → {r.ours_ms:.3f} ms "
                  f"({r.speedup:.2f}×{cost})", flush=True)  # fmt: skip
    print()
    print(markdown(rows, label))
    print(f"\n({time.perf_counter() - t0:.1f} s; ratios are against the baseline timed in this process)")
    if args.json:
        payload = {"machine": info, "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                   "label": label, "rows": [asdict(r) for r in rows]}  # fmt: skip
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0
