"""Time a tiny Wan forward through the ComfyUI loader's W4A4 layers against full precision.

The model is diffusers' `WanTransformer3DModel` with random weights; the QVGen run swaps every
linear layer for the layer class the ComfyUI loader builds (`qvgen_nodes.ops`, on a stand-in for
ComfyUI's `manual_cast` operations), loaded with round-to-nearest W4A4 tensors
(`qvgen.packed_layer.quantize_linear`). Both forwards run in this process, interleaved; the
figure is the ratio of their medians (< 1 would mean W4A4 is faster). Also printed: the memory of
the packed tensors and of the CPU path's cached weight codes.

Examples:
  python -m qvgen.bench comfy                         # CPU, < 30 s
  python -m qvgen.bench comfy --threads 1 --clock cpu # steadier on a busy machine
  python -m qvgen.bench comfy --dim 512 --layers 4 --frames 9 --size 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HELP = "tiny Wan forward through the ComfyUI loader's W4A4 layers vs full precision"


class PlainOps:
    """Stands in for `comfy.ops.manual_cast` (no ComfyUI needed): a Linear that casts its weight."""

    class Linear(nn.Linear):
        weight_function: list = []
        bias_function: list = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), b)


def tiny_wan(dim: int, layers: int, ffn: int, text_dim: int) -> nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    heads = max(1, dim // 128)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=dim // heads,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=256,
        ffn_dim=ffn,
        num_layers=layers,
    ).eval()


def quantize_with_loader_layers(model: nn.Module, backend: str) -> tuple[nn.Module, list[nn.Module]]:
    """Swap every linear layer for the ComfyUI loader's QVGen layer (RTN W4A4), in place."""
    from qvgen.config import QVGenConfig
    from qvgen.packed_layer import quantize_linear
    from qvgen_nodes.ops import OpsSettings, make_ops

    config = QVGenConfig(rank=0, n_buckets=1)
    settings = OpsSettings(config=config, backend=backend)
    linear_cls = make_ops(PlainOps, settings).Linear
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        layer = linear_cls(m.in_features, m.out_features, m.bias is not None, dtype=m.weight.dtype)
        layer.load_packed(quantize_linear(m.weight, m.bias, config, name=name, clip_search=False), name=name)
        model.set_submodule(name, layer)
    return model, settings.layers


def _inputs(batch: int, frames: int, size: int, text_len: int, text_dim: int) -> tuple:
    g = torch.Generator().manual_seed(1)
    lat = (frames - 1) // 4 + 1
    x = torch.randn(batch, 16, lat, size // 8, size // 8, generator=g)
    t = torch.full((batch,), 500.0)
    ctx = torch.randn(batch, text_len, text_dim, generator=g)
    return x, t, ctx


def measure(args: argparse.Namespace) -> dict:
    import copy

    fp = tiny_wan(args.dim, args.layers, args.ffn, args.text_dim)
    q, layers = quantize_with_loader_layers(copy.deepcopy(fp), args.backend)
    x, t, ctx = _inputs(args.batch, args.frames, args.size, args.text_len, args.text_dim)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {"fp32": [], "w4a4": []}
    with torch.inference_mode():
        for _ in range(args.warmup):
            fp(x, t, ctx, return_dict=False)
            q(x, t, ctx, return_dict=False)
        for _ in range(args.repeats):  # interleaved, so drifts of a shared machine hit both alike
            for key, model in (("fp32", fp), ("w4a4", q)):
                t0 = clock()
                model(x, t, ctx, return_dict=False)
                times[key].append(clock() - t0)
    fp_ms, q_ms = (statistics.median(times[k]) * 1e3 for k in ("fp32", "w4a4"))
    packed = sum(p.numel() * p.element_size() for m in layers for p in m.parameters())
    cached = sum(m.cached_codes_bytes() for m in layers)
    fp_bytes = sum(m.weight.numel() * m.weight.element_size() for m in fp.modules() if isinstance(m, nn.Linear))
    tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
    return {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": {"dim": args.dim, "ffn": args.ffn, "layers": args.layers, "text_dim": args.text_dim},
        "tokens": tokens,
        "backend": args.backend,
        "clock": args.clock,
        "fp32_ms": fp_ms,
        "w4a4_ms": q_ms,
        "ratio": q_ms / fp_ms,
        "linear_weights_fp32_mib": fp_bytes / 2**20,
        "packed_mib": packed / 2**20,
        "cpu_code_cache_mib": cached / 2**20,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dim", type=int, default=256, help="model width (a multiple of 128, as ComfyUI's Wan needs)")
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--text-dim", type=int, default=4096, help="4096: what ComfyUI's Wan expects")
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--size", type=int, default=128, help="pixel height = width")
    p.add_argument("--batch", type=int, default=2, help="2: a cond/uncond pair under CFG")
    p.add_argument("--backend", default="cpu", help="qvgen_kernels backend: cpu (default), torch, auto")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall clock, or this process's CPU time (steadier on a shared machine)")  # fmt: skip
    p.add_argument("--json", type=Path, default=None, help="also write the result here")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args)
    print(
        f"tiny Wan (dim {r['model']['dim']}, {r['model']['layers']} blocks, {r['tokens']} tokens × batch {args.batch}) "
        f"on CPU, {r['threads']} threads, backend {r['backend']}, {r['clock']} clock\n"
        f"  full precision (fp32)      {r['fp32_ms']:8.1f} ms\n"
        f"  W4A4 (loader's layers)     {r['w4a4_ms']:8.1f} ms   ratio {r['ratio']:.2f}×\n"
        f"  linear weights: fp32 {r['linear_weights_fp32_mib']:.1f} MiB, packed {r['packed_mib']:.1f} MiB, "
        f"CPU code cache {r['cpu_code_cache_mib']:.1f} MiB"
    )
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0
