"""Time the quantized linear layer (W4A4 by default, activation quantization included) against
the float baseline measured in the same process, over the linear-layer shapes of Wan 2.1.

On CUDA the baseline is a bf16 `F.linear` (cuBLAS) and ours the Triton path; on CPU the
baseline is an fp32 `nn.Linear` (with bf16 alongside) and ours the `cpu` backend. When
`comfy_kitchen` is importable its `int8_linear` and `convrot_w4a4_linear` are timed too.

Examples:
  python -m qvgen.bench kernels                       # CPU: small token counts, < 1 min
  python -m qvgen.bench kernels --models 1.3b,14b --tokens 32760,8192,512 --json out.json
  python -m qvgen.bench kernels --shapes 1536x1536 --tokens 4096 --min-time 2
  python -m qvgen.bench kernels --transform hadamard  # + rotation in the quantizer; cost vs without
  python -m qvgen.bench kernels --widened             # + weights widened to a byte per code (qvgen.widen)
  python -m qvgen.bench kernels --act-group-size 128  # + activation scales per 128 features; cost vs per token
  python -m qvgen.bench kernels --vs-a-bits 8         # + the same layers with 8-bit inputs; cost vs --a-bits
  python -m qvgen.bench kernels --device-time --models 1.3b,14b --tokens 32760,8192,512   # issue #13 records
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

HELP = "quantized linear layer vs float matmul over Wan 2.1 layer shapes"

# Wan 2.1 transformer widths: model dim, FFN dim, text-encoder (umT5) dim
MODELS = {
    "1.3b": {"dim": 1536, "ffn": 8960, "text": 4096},
    "14b": {"dim": 5120, "ffn": 13824, "text": 4096},
    "tiny": {"dim": 64, "ffn": 160, "text": 96},  # Wan's layer structure at toy widths (tests, CI)
}
WAN_480P_81F_TOKENS = 32760  # 21 latent frames × 30 × 52 patches
GPU_TOKENS = (WAN_480P_81F_TOKENS, 8192, 512, 16)
CPU_TOKENS = (256, 1024)


def layer_shapes(model: str) -> list[tuple[str, int, int]]:
    """(layer, K in, N out) of one Wan block's linear layers (+ the text projection)."""
    d = MODELS[model]
    return [
        ("attn q/k/v/o", d["dim"], d["dim"]),
        ("ffn up", d["dim"], d["ffn"]),
        ("ffn down", d["ffn"], d["dim"]),
        ("text proj", d["text"], d["dim"]),
    ]


@dataclass
class Row:
    model: str
    layer: str
    m: int
    k: int
    n: int
    weight_mb_float: float
    weight_mb_packed: float
    baseline: str
    baseline_ms: float
    ours_ms: float
    speedup: float
    ours_tops: float
    extra_ms: dict[str, float | None] = field(default_factory=dict)
    transform: str = "none"
    transform_pct: float | None = None  # (ours − ours without the transform) / ours, in %
    act_group_ratio: float | None = None  # ours with per-group activation scales / ours per token
    vs_a_bits_ratio: float | None = None  # ours with --vs-a-bits activations / ours with --a-bits


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def time_ms(
    fns: dict[str, Callable[[], object]], device: torch.device, min_time: float, stat: str = "median"
) -> dict[str, float]:
    """Time each function in ms, round-robin, until each has run ≥ `min_time` s (and ≥ 3 times).

    Interleaving keeps the comparison fair when the machine's load drifts; `stat="min"` is the
    robust choice on a shared machine. CUDA events on GPU, the wall clock on CPU.
    """
    for fn in fns.values():  # warm-up: allocation, autotuning, compilation
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.synchronize(device)
    while any(sum(t) < min_time * 1e3 or len(t) < 3 for t in times.values()):
        for name, fn in fns.items():
            if sum(times[name]) >= min_time * 1e3 and len(times[name]) >= 3:
                continue
            if gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    pick = min if stat == "min" else statistics.median
    return {name: pick(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------
def make_packed_layer(n: int, k: int, w_bits: int, rank: int, device: torch.device, dtype: torch.dtype) -> dict:
    """A random layer in the QVGen packed format (the values do not affect the timing)."""
    from qvgen.packed_layer import assemble

    q = torch.randint(0, 2**w_bits, (n, k), dtype=torch.uint8)
    t = assemble(q, torch.rand(n) * 0.01 + 1e-3, torch.rand(n) * (2**w_bits - 1), w_bits)
    layer = {
        "qweight": t["qweight"].to(device),
        "w_scale": t["weight_scale"].to(device),
        "w_zero": t["weight_zero"].to(device),
        "w_qsum": t["weight_qsum"].to(device),
        "bias": torch.randn(n, device=device, dtype=dtype),
        "phi_down": None,
        "phi_up": None,
    }
    if rank:
        layer["phi_down"] = torch.randn(rank, k, device=device, dtype=dtype) * 0.01
        layer["phi_up"] = torch.randn(n, rank, device=device, dtype=dtype) * 0.01
    return layer


def comfy_kitchen_fns(w: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], object] | None]:
    """comfy-kitchen's `int8_linear` and `convrot_w4a4_linear` on the same shape, if importable."""
    try:
        import comfy_kitchen as ck
    except Exception:  # not installed, or its native parts fail to load
        return {}
    out: dict[str, Callable[[], object] | None] = {}
    try:
        wq, ws = ck.quantize_int8_rowwise(w)
        out["ck int8_linear"] = lambda: ck.int8_linear(x, wq, ws, bias, out_dtype=x.dtype)
        out["ck int8_linear"]()
    except Exception:
        out["ck int8_linear"] = None
    try:
        cq, cs = ck.quantize_convrot_w4a4_weight(w)
        out["ck convrot_w4a4"] = lambda: ck.convrot_w4a4_linear(x, cq, cs, bias)
        out["ck convrot_w4a4"]()
    except Exception:
        out["ck convrot_w4a4"] = None
    return out


def bench_case(
    model: str,
    layer: str,
    m: int,
    k: int,
    n: int,
    args: argparse.Namespace,
    device: torch.device,
) -> Row:
    from qvgen.kernels_import import qvgen_kernels as qk

    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    bias = torch.randn(n, device=device, dtype=dtype)
    x = torch.randn(m, k, device=device, dtype=dtype)
    packed = make_packed_layer(n, k, args.w_bits, args.rank, device, dtype)
    tf = transform_kwargs(args.transform, k, device)

    def ours(qweight: torch.Tensor = packed["qweight"], a_bits: int | None = args.a_bits, **extra) -> torch.Tensor:
        return qk.quantized_linear(
            x,
            qweight,
            packed["w_scale"],
            packed["w_zero"],
            packed["w_qsum"],
            packed["bias"],
            in_features=k,
            w_bits=args.w_bits,
            a_bits=a_bits,
            clip_lo=0.9025,
            clip_hi=0.9025,
            phi_down=packed["phi_down"],
            phi_up=packed["phi_up"],
            backend=args.backend,
            **extra,
        )

    fns: dict[str, Callable[[], object]] = {"baseline": lambda: F.linear(x, w, bias), "ours": lambda: ours(**tf)}
    if tf:
        fns["no transform"] = ours
    group = getattr(args, "act_group_size", None)
    grouped = f"groups of {group}"
    if group and args.a_bits is not None and k % group == 0 and group < k:  # as act_group_length decides
        fns[grouped] = lambda: ours(**tf, act_group=group)
    vs_bits = getattr(args, "vs_a_bits", None)  # e.g. 8: the same layer with 8-bit inputs (per-layer mixed precision)
    vs = f"A{vs_bits}"
    if vs_bits and args.a_bits is not None:
        fns[vs] = lambda: ours(a_bits=vs_bits, **tf)
    if args.widened and args.w_bits <= 4:  # one code per byte (qvgen.widen): no nibble unpacking
        wide = qk.unpack_weight(packed["qweight"], args.w_bits, k)
        fns["widened"] = lambda: ours(wide, **tf)
    with torch.inference_mode():
        if not gpu and not args.no_bf16:
            xb, wb, bb = x.bfloat16(), w.bfloat16(), bias.bfloat16()
            fns["bf16 linear"] = lambda: F.linear(xb, wb, bb)
        if args.a_bits is not None:
            a_bits = args.a_bits
            fns["act quant"] = lambda: qk.quantize_activation(x, 0.9, 0.9, a_bits, backend=args.backend)
        extra: dict[str, float | None] = {}
        if not args.no_comfy:
            ck_x = x if gpu else x.bfloat16()
            for name, fn in comfy_kitchen_fns(w.to(ck_x.dtype), bias.to(ck_x.dtype), ck_x).items():
                if fn is None:
                    extra[name] = None
                else:
                    fns[name] = fn
        ms = time_ms(fns, device, args.min_time, args.stat)
    base_ms, ours_ms = ms.pop("baseline"), ms.pop("ours")
    extra.update(ms)
    pct = (ours_ms - ms["no transform"]) / ours_ms * 100 if tf else None
    flops = 2.0 * m * n * k
    packed_bytes = packed["qweight"].numel() + 12 * n  # + scale, zero point, Σq per channel
    return Row(
        model=model,
        layer=layer,
        m=m,
        k=k,
        n=n,
        weight_mb_float=n * k * w.element_size() / 2**20,
        weight_mb_packed=packed_bytes / 2**20,
        baseline=f"{'bf16' if gpu else 'fp32'} F.linear",
        baseline_ms=base_ms,
        ours_ms=ours_ms,
        speedup=base_ms / ours_ms,
        ours_tops=flops / (ours_ms * 1e-3) / 1e12,
        extra_ms=extra,
        transform=args.transform,
        transform_pct=pct,
        act_group_ratio=ms[grouped] / ours_ms if grouped in ms else None,
        vs_a_bits_ratio=ms[vs] / ours_ms if vs in ms else None,
    )


def transform_kwargs(kind: str, k: int, device: torch.device) -> dict:
    """The kernels' transform arguments for `--transform` (random signs/scales; block as PackedLinear)."""
    if kind == "none":
        return {}
    out: dict = {}
    if "hadamard" in kind:
        out["input_signs"] = (torch.randint(0, 2, (k,)) * 2 - 1).to(device=device, dtype=torch.int8)
        out["rot_block"] = min(k & -k, 256)
    if "smooth" in kind:
        out["smooth"] = (torch.rand(k) + 0.5).to(device)
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def machine(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(rows: list[Row], ours_label: str) -> str:
    extras = sorted({k for r in rows for k in r.extra_ms})
    head = ["model", "layer", "M", "K", "N", "weights MB (float → packed)", rows[0].baseline + " ms"]
    head += [f"{ours_label} ms", "speed-up", "TOPS"] + [f"{e} ms" for e in extras]
    with_tf = any(r.transform_pct is not None for r in rows)
    if with_tf:
        head.append(f"{rows[0].transform} cost %")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.model,
            r.layer,
            str(r.m),
            str(r.k),
            str(r.n),
            f"{r.weight_mb_float:.1f} → {r.weight_mb_packed:.1f}",
            f"{r.baseline_ms:.3f}",
            f"{r.ours_ms:.3f}",
            f"{r.speedup:.2f}×",
            f"{r.ours_tops:.2f}",
        ]
        for e in extras:
            v = r.extra_ms.get(e, "")
            cells.append("n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else ""))
        if with_tf:
            cells.append("" if r.transform_pct is None else f"{r.transform_pct:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
