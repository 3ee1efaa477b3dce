"""Time each ComfyUI-native format's linear layer (what ComfyUI runs for a `--scheme` export) against
the float `F.linear` of the same shape, in one process, over Wan 2.1's layer shapes.

Each layer is a round-to-nearest layer of the format, built the way a trained one is shipped
(`QVGenLinear` → the scheme's `pack`). On a GPU where comfy-kitchen reports a cuda/triton/hip
backend it runs through comfy-kitchen's kernels, as ComfyUI runs it (`qvgen.adapters.comfy.kitchen`);
elsewhere through this project's dequantized PyTorch compute, whose speed says nothing about
ComfyUI's. Each row also gives the route's relative L2 gap to our dequantized compute (a check
that the kernel computes the file's arithmetic) and to the float layer (the quantization error).

Examples:
  python -m qvgen.bench native                                  # CPU, tiny shapes, < 1 min
  python -m qvgen.bench native --models 1.3b --tokens 32760,512 --json out.json   # on a GPU
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.comfy import kitchen
from ..config import QVGenConfig
from ..layers import QVGenLinear
from ..schemes import get_scheme
from .kernels import MODELS, layer_shapes, machine, time_ms

HELP = "ComfyUI-native formats' layers (comfy-kitchen's kernels on GPU) vs float F.linear"
DESCRIPTION = __doc__

# scheme -> the config a shipped layer of it has (the demo's and `python -m qvgen.train`'s defaults)
SCHEMES: dict[str, dict] = {
    "convrot_w4a4": dict(rank=0),
    "nvfp4": dict(rank=0, input_transform="none"),
    "svdquant_w4a4": dict(rank=32, final_rank=32, act_bits=4, input_transform="smooth"),
    "w4a8_int8": dict(rank=0, act_bits=8, input_transform="none"),
}


def native_layer(scheme: str, linear: nn.Linear, x: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    """A round-to-nearest inference layer of `scheme` made from `linear` (clip search and Φ's SVD on),
    calibrated on `x` (NVFP4's input scale)."""
    config = QVGenConfig(scheme=scheme, n_buckets=1, **SCHEMES[scheme])
    trained = QVGenLinear.from_linear(linear, config, name="bench")
    with torch.no_grad():
        trained(x.float())
    return get_scheme(scheme).pack(trained, config, dtype, "bench").eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def bench_shape(scheme: str, layer_name: str, m: int, k: int, n: int, args: argparse.Namespace) -> dict:
    """One row: the format's layer and the float layer on the same (m, k) input."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    row: dict = {"scheme": scheme, "layer": layer_name, "m": m, "k": k, "n": n}
    why = get_scheme(scheme).unsupported(k)
    if why:
        return {**row, "skipped": why}
    torch.manual_seed(0)
    linear = nn.Linear(k, n, device=device)
    x = torch.randn(m, k, device=device, dtype=dtype)
    layer = native_layer(scheme, linear, x, dtype).to(device)
    kitchen.use_comfy_kitchen(layer)
    w, b = linear.weight.to(dtype), linear.bias.to(dtype)
    backend = kitchen.gpu_backend(device, layer)
    with torch.inference_mode():
        fns = {"float": lambda: F.linear(x, w, b), "native": lambda: layer(x)}
        ms = time_ms(fns, device, args.min_time, args.stat)
        y_route = layer(x)
        y_float = F.linear(x, w, b)
        ours = super(kitchen.KitchenRoute, layer).forward(x)  # our dequantized compute of the same tensors
    return {
        **row,
        "route": f"comfy-kitchen {backend}" if backend else "qvgen dequantized (PyTorch)",
        "float": f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} F.linear",
        "float_ms": ms["float"],
        "native_ms": ms["native"],
        "speedup": ms["float"] / ms["native"],
        "gap_to_ours": _rel(y_route, ours),
        "error_vs_float": _rel(y_route, y_float),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated: " + ",".join(SCHEMES))
    p.add_argument("--models", default="1.3b", help=f"Wan 2.1 sizes for the shapes: {', '.join(MODELS)}")
    p.add_argument("--shapes", default=None, help="custom KxN list, e.g. 1536x1536,1536x8960 (replaces --models)")
    p.add_argument("--tokens", default=None, help="token counts M (default: GPU 32760,512; CPU 256)")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed runs per measurement")
    p.add_argument("--stat", choices=("median", "min"), default="median")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="also write the rows and the machine here")


def _shapes(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    if args.shapes:
        return [(s, *map(int, s.lower().split("x"))) for s in args.shapes.split(",")]
    return [shape for model in args.models.split(",") for shape in layer_shapes(model)]


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    tokens = [int(t) for t in (args.tokens or ("32760,512" if gpu else "256")).split(",")]
    args.min_time = args.min_time if args.min_time is not None else (0.2 if gpu else 0.5)
    schemes = [s for s in args.schemes.split(",") if s]
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise SystemExit(f"--schemes: unknown {unknown}; expected some of {list(SCHEMES)}")
    if kitchen.kitchen() is None:
        print("comfy_kitchen is not installed: every layer runs our dequantized compute")
    rows: list[dict] = []
    info = machine(torch.device(args.device))
    for scheme in schemes:
        for name, k, n in _shapes(args):
            for m in tokens:
                rows.append(bench_shape(scheme, name, m, k, n, args))
                print(_line(rows[-1]))
                if args.json:  # after every row, so a run cut short by a time limit keeps what it measured
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    return 0


def _line(r: dict) -> str:
    head = f"{r['scheme']:14s} {r['layer']:14s} M={r['m']:<6d} K={r['k']:<5d} N={r['n']:<5d}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    return (
        f"{head} {r['float']} {r['float_ms']:8.3f} ms  native {r['native_ms']:8.3f} ms  speedup {r['speedup']:5.2f}×"
        f"  via {r['route']}  (gap to ours {r['gap_to_ours']:.1e}, error vs float {r['error_vs_float']:.3f})"
    )
