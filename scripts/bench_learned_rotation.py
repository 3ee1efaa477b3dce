"""Inference cost of a learned block-diagonal rotation (`QVGenConfig.learned_rotation`) on CPU.

At run time the learned rotation is one more op before quantization: `x · blockdiag(C)` with b×b
blocks (b multiply-adds per input element), after the Hadamard the kernel already applies. This
times it against the layer it precedes, in the same process, interleaved (`qvgen.bench.kernels.time_ms`):
the packed W4A4 layer with smoothing + Hadamard (the CPU path) and the fp32 `F.linear`.

    python scripts/bench_learned_rotation.py --threads 1 --output docs/bench/learned-rotation-cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from qvgen.bench.kernels import CPU_TOKENS, layer_shapes, machine, make_packed_layer, time_ms, transform_kwargs
from qvgen.kernels_import import qvgen_kernels as qk
from qvgen.transforms import block_rotate, cayley


def case(m: int, k: int, n: int, blocks: list[int], min_time: float) -> dict:
    x = torch.randn(m, k)
    w, bias = torch.randn(n, k) / k**0.5, torch.randn(n)
    packed = make_packed_layer(n, k, 4, 0, torch.device("cpu"), torch.float32)
    tf = transform_kwargs("smooth_hadamard", k, torch.device("cpu"))

    def layer() -> torch.Tensor:
        return qk.quantized_linear(
            x,
            packed["qweight"],
            packed["w_scale"],
            packed["w_zero"],
            packed["w_qsum"],
            packed["bias"],
            in_features=k,
            w_bits=4,
            a_bits=4,
            clip_lo=0.9025,
            clip_hi=0.9025,
            backend="cpu",
            **tf,
        )

    fns = {"w4a4 layer (smooth+hadamard)": layer, "fp32 F.linear": lambda: F.linear(x, w, bias)}
    for b in blocks:
        c = cayley(torch.randn(k // b, b, b) * 0.1)
        fns[f"rotation b={b}"] = lambda c=c: block_rotate(x, c)
    with torch.inference_mode():
        ms = time_ms(fns, torch.device("cpu"), min_time, "min")
    out = {"m": m, "k": k, "n": n, "ms": ms}
    for b in blocks:
        r = ms[f"rotation b={b}"]
        out[f"b{b}_vs_layer"] = r / ms["w4a4 layer (smooth+hadamard)"]
        out[f"b{b}_vs_fp32_linear"] = r / ms["fp32 F.linear"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--blocks", type=lambda v: [int(b) for b in v.split(",")], default=[64, 128])
    p.add_argument("--model", default="1.3b")
    p.add_argument("--min-time", type=float, default=0.5)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for layer, k, n in layer_shapes(args.model):
        for m in CPU_TOKENS:
            row = {"layer": layer, **case(m, k, n, args.blocks, args.min_time)}
            rows.append(row)
            ratios = ", ".join(f"b={b}: {row[f'b{b}_vs_layer']:.3f}× layer" for b in args.blocks)
            print(f"{layer:14s} M={m:5d} K={k:5d} N={n:5d}  {ratios}", flush=True)
    result = {
        "command": "python scripts/bench_learned_rotation.py "
        f"--threads {args.threads} --blocks {','.join(map(str, args.blocks))} --model {args.model} "
        f"--min-time {args.min_time}",
        "torch": torch.__version__,
        "machine": machine(torch.device("cpu")),
        "rows": rows,
    }
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
