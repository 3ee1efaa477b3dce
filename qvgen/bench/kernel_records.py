"""`python -m qvgen.bench kernels --device-time`: the layer and block rows of issue #13 as records.

Per row (a Wan layer shape at M tokens, or a block pair): the float baseline (cuBLAS bf16 on CUDA,
fp32 `F.linear` on CPU) against our W4A4 call as the doors make it, plus

- `host_ms`: CPU time to issue our call (Python, checks, allocation) — a column of its own;
- `quant_ms` / `gemm_ms`: the quantization kernel alone and the GEMM alone, in the layout the
  layer uses (even/odd halves for packed weights, plain rows for widened ones);
- `ours_fp8_ms` (sm_90): the same layer on the experimental fp8 GEMM (`qvgen_kernels.fp8_gemm`);
- `ceilings`: vendor GEMMs on operands of the same shape, quantization excluded — cuBLAS int8
  (`torch._int_mm`) and fp8 e4m3 rowwise-scaled (`torch._scaled_mm`); `null` where refused;
- block pairs: LayerNorm + modulation → QKV as one N = 3·dim GEMM, and FFN-up + GELU → FFN-down,
  each against the same pair in bf16.

On CUDA every time is device time (`timing.device_ms`: CUDA-graph replay, L2 flushed before
each call); on CPU the rows are wall time (`"timing": "wall"`). Records go to
`docs/bench/kernels-<gpu>.json` (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .timing import device_ms, host_ms

SCHEMA = "qvgen.bench.kernels/2"
RECORD_KEYS = ("model", "layer", "M", "K", "N", "baseline_ms", "ours_ms", "speedup", "timing", "gpu", "torch", "triton")


def gpu_slug(device: torch.device) -> str:
    """A file-name tag for the device: "h100-80gb-hbm3", "h200", …; "cpu" without a GPU."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def vendor_ceilings(m: int, k: int, n: int, device: torch.device) -> dict[str, Callable[[], object] | None]:
    """Vendor GEMMs on int8 / fp8 operands of this shape (codes as ours: |a| ≤ 15, |b| ≤ 8)."""
    a8 = torch.randint(-15, 16, (m, k), dtype=torch.int8, device=device)
    b8 = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=device)
    out: dict[str, Callable[[], object] | None] = {}

    def int_mm() -> torch.Tensor:
        return torch._int_mm(a8, b8.t())

    fp8 = getattr(torch, "float8_e4m3fn", None)
    a_f8 = a8.float().to(fp8) if fp8 is not None else None
    b_f8 = b8.float().to(fp8) if fp8 is not None else None
    sa = torch.ones(m, 1, device=device)
    sb = torch.ones(1, n, device=device)

    def scaled_mm() -> torch.Tensor:
        return torch._scaled_mm(a_f8, b_f8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)

    for name, fn in (("int_mm int8", int_mm), ("scaled_mm fp8 rowwise", scaled_mm)):
        try:
            fn()
            out[name] = fn
        except Exception:  # shape, device or build refuses it
            out[name] = None
    return out


def _layer(n: int, k: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    from .kernels import make_packed_layer

    layer = make_packed_layer(n, k, args.w_bits, 0, device, dtype)
    if args.widened and args.w_bits <= 4:
        from qvgen.kernels_import import qvgen_kernels as qk

        layer["qweight"] = qk.unpack_weight(layer["qweight"], args.w_bits, k)
    return layer


def _ours(layer: dict, k: int, args: argparse.Namespace) -> Callable[[torch.Tensor], torch.Tensor]:
    from qvgen.kernels_import import qvgen_kernels as qk

    def fn(x: torch.Tensor) -> torch.Tensor:
        return qk.quantized_linear(
            x, layer["qweight"], layer["w_scale"], layer["w_zero"], layer["w_qsum"], layer["bias"],
            in_features=k, w_bits=args.w_bits, a_bits=args.a_bits, clip_lo=0.9025, clip_hi=0.9025,
            backend=args.backend,
        )  # fmt: skip

    return fn


def _stages(layer: dict, x: torch.Tensor, k: int, args: argparse.Namespace, backend: str) -> dict:
    """Quant-only and GEMM-only callables in the layer's own layout (Triton); quant-only on CPU."""
    from qvgen.kernels_import import qvgen_kernels as qk

    if args.a_bits is None:
        return {}
    if backend != "triton":
        return {"quant": lambda: qk.quantize_activation(x, 0.9025, 0.9025, args.a_bits, backend=backend)}
    from qvgen_kernels import triton_linear as tk

    st = tk.layer_stages(
        x, layer["qweight"], layer["w_scale"], layer["w_zero"], layer["w_qsum"], layer["bias"],
        in_features=k, w_bits=args.w_bits, a_bits=args.a_bits, clip_lo=0.9025, clip_hi=0.9025,
    )  # fmt: skip
    staged = st.quant()
    return {"quant": st.quant, "gemm": lambda: st.gemm(staged)}


def _fp8_layer(layer: dict, x: torch.Tensor, k: int, args, backend: str) -> Callable[[], object] | None:
    """The experimental fp8 GEMM route (`qvgen_kernels.fp8_gemm`) on sm_90+, W≤4A≤4 only."""
    if backend != "triton" or args.a_bits is None or args.a_bits > 4 or args.w_bits > 4:
        return None
    if x.device.type != "cuda" or torch.cuda.get_device_capability(x.device)[0] < 9:
        return None
    from qvgen_kernels import fp8_gemm

    w8 = fp8_gemm.fp8_weight_codes(layer["qweight"], args.w_bits, k)
    return lambda: fp8_gemm.fp8_linear(
        x, w8, layer["w_scale"], layer["w_zero"], layer["w_qsum"], layer["bias"], in_features=k,
        a_bits=args.a_bits, clip_lo=0.9025, clip_hi=0.9025,
    )  # fmt: skip


def layer_fns(m: int, k: int, n: int, args, device, backend: str) -> dict:
    """The functions to time for one linear layer: baseline, ours, its stages, the ceilings."""
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    b = torch.randn(n, device=device, dtype=dtype)
    layer = _layer(n, k, args, device, dtype)
    ours = _ours(layer, k, args)
    fns = {"baseline": lambda: F.linear(x, w, b), "ours": lambda: ours(x)}
    for role, fn in _stages(layer, x, k, args, backend).items():
        fns[role] = fn
    fp8 = _fp8_layer(layer, x, k, args, backend)
    if fp8 is not None:
        fns["ours fp8"] = fp8
    if not args.no_ceilings:
        for name, fn in vendor_ceilings(m, k, n, device).items():
            fns[f"ceiling {name}"] = fn
    return fns


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Wan's pre-attention/FFN norm: LayerNorm without affine, then `· (1 + scale) + shift`."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


def block_fns(kind: str, m: int, dim: int, ffn: int, args, device) -> dict:
    """A block pair in bf16 (baseline) and with W4A4 layers (ours), same inputs."""
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    x = torch.randn(m, dim, device=device, dtype=dtype)
    if kind == "qkv":
        shift, scale = (torch.randn(dim, device=device, dtype=dtype) * 0.1 for _ in range(2))
        w = torch.randn(3 * dim, dim, device=device, dtype=dtype) / dim**0.5
        b = torch.randn(3 * dim, device=device, dtype=dtype)
        ours = _ours(_layer(3 * dim, dim, args, device, dtype), dim, args)
        return {
            "baseline": lambda: F.linear(_modulate(x, shift, scale), w, b),
            "ours": lambda: ours(_modulate(x, shift, scale)),
        }
    w_up = torch.randn(ffn, dim, device=device, dtype=dtype) / dim**0.5
    w_down = torch.randn(dim, ffn, device=device, dtype=dtype) / ffn**0.5
    b_up, b_down = torch.randn(ffn, device=device, dtype=dtype), torch.randn(dim, device=device, dtype=dtype)
    up = _ours(_layer(ffn, dim, args, device, dtype), dim, args)
    down = _ours(_layer(dim, ffn, args, device, dtype), ffn, args)
    return {
        "baseline": lambda: F.linear(F.gelu(F.linear(x, w_up, b_up), approximate="tanh"), w_down, b_down),
        "ours": lambda: down(F.gelu(up(x), approximate="tanh")),
    }


def time_fns(fns: dict, device: torch.device, args) -> tuple[dict[str, float | None], dict[str, float], str]:
    """(ms per function, host ms of baseline/ours, timing kind). None-valued functions stay None."""
    live = {k: v for k, v in fns.items() if v is not None}
    ms: dict[str, float | None] = {k: None for k, v in fns.items() if v is None}
    with torch.inference_mode():
        if device.type != "cuda":
            from .kernels import time_ms

            ms.update(time_ms(live, device, args.min_time, args.stat))
            return ms, {}, "wall"
        for fn in live.values():  # warm-up: autotuning, compilation, allocator
            fn()
            fn()
        methods = set()
        for name, fn in live.items():
            ms[name], method = device_ms(fn, device)
            methods.add(method)
        host = {name: host_ms(live[name], device) for name in ("baseline", "ours")}
    return ms, host, "device" if methods == {"cuda-graph"} else "device (do_bench)"


def record(model: str, layer: str, m: int, k: int, n: int, ms: dict, host: dict, timing: str, env: dict) -> dict:
    base, ours = ms.pop("baseline"), ms.pop("ours")
    rec = {"model": model, "layer": layer, "M": m, "K": k, "N": n, "baseline_ms": base, "ours_ms": ours,
           "speedup": base / ours, "timing": timing.split(" ")[0], "method": timing, **env}  # fmt: skip
    rec["host_ms"] = host.get("ours")
    rec["baseline_host_ms"] = host.get("baseline")
    rec["quant_ms"] = ms.pop("quant", None)
    rec["gemm_ms"] = ms.pop("gemm", None)
    rec["ours_fp8_ms"] = ms.pop("ours fp8", None)  # experimental fp8 GEMM route (sm_90)
    rec["ceilings_ms"] = {name.removeprefix("ceiling "): v for name, v in ms.items() if name.startswith("ceiling ")}
    return rec


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_version}


def markdown(records: list[dict]) -> str:
    ceil = sorted({c for r in records for c in r["ceilings_ms"]})
    head = ["model", "layer", "M", "K", "N", "baseline ms", "ours ms", "speed-up", "host ms", "quant ms", "gemm ms"]
    head.append("ours fp8 ms")
    head += [f"{c} ms" for c in ceil]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v) -> str:
        return "" if v is None else f"{v:.3f}"

    for r in records:
        cells = [r["model"], r["layer"], str(r["M"]), str(r["K"]), str(r["N"]), f(r["baseline_ms"]), f(r["ours_ms"])]
        cells += [f"{r['speedup']:.2f}×", f(r["host_ms"]), f(r["quant_ms"]), f(r["gemm_ms"]), f(r["ours_fp8_ms"])]
        cells += [f(r["ceilings_ms"].get(c)) if c in r["ceilings_ms"] else "" for c in ceil]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_device_time(args, device: torch.device, cases: list[tuple], tokens: list[int], backend: str) -> int:
    """All rows (layers, then block pairs of each model), printed as a table and written as JSON."""
    from .kernels import MODELS

    env = environment(device)
    records: list[dict] = []
    t0 = time.perf_counter()
    skipped: list[dict] = []
    out = args.out or os.path.join("docs", "bench", f"kernels-{gpu_slug(device)}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    config = {k: v for k, v in vars(args).items() if not k.startswith("_")}

    def save() -> None:  # after every row: a run stopped by a time limit keeps what it measured
        with open(out, "w") as fh:
            json.dump({"schema": SCHEMA, "config": config, "records": records, "skipped": skipped}, fh, indent=2)

    def over_budget(row: dict) -> bool:
        if args.budget_s and time.perf_counter() - t0 > args.budget_s:
            skipped.append({**row, "reason": f"budget of {args.budget_s}s spent"})
            return True
        return False

    for model, layer, k, n in cases:
        for m in tokens:
            if over_budget({"model": model, "layer": layer, "M": m}):
                continue
            ms, host, timing = time_fns(layer_fns(m, k, n, args, device, backend), device, args)
            records.append(record(model, layer, m, k, n, ms, host, timing, env))
            save()
            print(f"  {model} {layer} M={m}: {records[-1]['baseline_ms']:.3f} → {records[-1]['ours_ms']:.3f} ms",
                  flush=True)  # fmt: skip
    for model in [] if args.no_blocks or args.shapes else args.models.split(","):
        d = MODELS[model.strip()]
        pairs = (("qkv", "block norm+mod → qkv", 3 * d["dim"]), ("ffn", "block ffn up+gelu → down", d["dim"]))
        for kind, name, n in pairs:
            for m in tokens:
                if over_budget({"model": model.strip(), "layer": name, "M": m}):
                    continue
                ms, host, timing = time_fns(block_fns(kind, m, d["dim"], d["ffn"], args, device), device, args)
                records.append(record(model.strip(), name, m, d["dim"], n, ms, host, timing, env))
                save()
    print()
    print(markdown(records))
    print(f"\n({time.perf_counter() - t0:.1f} s; ratios are against the baseline timed in this process)")
    save()
    print(f"wrote {out}")
    return 0
