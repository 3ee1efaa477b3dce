"""One denoising step of a Wan 2.1 transformer as samplers run it (conditional + unconditional
pass), bf16 against W4A4, with 8-bit attention where a package for it is installed (issue #14).

The models are built from Wan 2.1's real configs (1.3B, 14B) with random weights (no download):
the bf16 model as diffusers' `WanTransformer3DModel`, the W4A4 one with every linear layer a
QVGen `PackedLinear` (random 4-bit codes: the values do not change the time). Rows:

- `bf16` with torch's own attention (diffusers backend `native`: SDPA picks flash/cuDNN/efficient);
- `w4a4` with the same attention;
- `w4a4` and `bf16` with 8-bit attention: the first available of diffusers' SageAttention
  backends (`--attention-8bit`); rows whose backend is unavailable are skipped, with the reason.

Columns: step time (CUDA events around warm steps; autotuning happens in the warm-up step),
peak memory during the step, weight memory. On CPU the default is a reduced model (Wan's
structure at toy widths) so the rows run in CI; its times are wall time.

Examples:
  python -m qvgen.bench step                                   # CPU: reduced model, seconds
  python -m qvgen.bench step --models 1.3b,14b --cases short,480p,720p --budget-s 300
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch
from torch import nn

HELP = "one denoising step of Wan 2.1 (cond + uncond): bf16 vs W4A4, 8-bit attention when available"

COMMON = dict(
    patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip
WAN_CONFIGS = {  # Wan-AI/Wan2.1-T2V-{1.3B,14B-Diffusers} transformer/config.json
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
    "reduced": dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=160, num_layers=2, text_dim=96, freq_dim=32),
}
# latent (frames, height, width) after the VAE (4× in time, 8× in space); tokens = f · h/2 · w/2
CASES = {
    "short": (2, 60, 104),  # 480×832, 5 frames: 3,120 tokens
    "480p": (21, 60, 104),  # 480×832, 81 frames: 32,760 tokens
    "720p": (21, 90, 160),  # 720×1280, 81 frames: 75,600 tokens
    "cpu": (2, 8, 8),  # the reduced model's case: 32 tokens
}
TEXT_TOKENS = 512  # Wan pads prompts to 512 umT5 tokens
ATTENTION_8BIT = ("sage", "_sage_qk_int8_pv_fp8_cuda_sm90", "_sage_qk_int8_pv_fp16_triton")
SCHEMA = "qvgen.bench.step/1"
RECORD_KEYS = (
    "model",
    "tokens",
    "variant",
    "attention",
    "step_ms",
    "speedup_vs_bf16",
    "peak_gib",
    "weights_gib",
    "gpu",
)


def tokens_of(case: tuple[int, int, int]) -> int:
    f, h, w = case
    return f * (h // 2) * (w // 2)


def _config(model: str) -> dict:
    return {**COMMON, **WAN_CONFIGS[model]}


@torch.no_grad()
def _fill(model: nn.Module) -> None:
    """Random weights of sane scale: linear-like ~ N(0, 1/fan_in), norms 1, biases 0; 4-bit codes
    uniform with scale ≈ 1/(4.6 √K) and zero point 7.5, as trained layers roughly have."""
    from qvgen import PackedLinear
    from qvgen.kernels_import import qvgen_kernels as qk

    packed = {id(p) for m in model.modules() if isinstance(m, PackedLinear) for p in m.parameters()}
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.qweight.random_(0, 256)  # any byte holds two valid 4-bit codes
            q = qk.unpack_weight(m.qweight, m.weight_bits, m.in_features)
            m.weight_qsum.copy_(q.sum(dim=1, dtype=torch.int32))
            m.weight_scale.fill_(1.0 / (4.6 * m.in_features**0.5))
            m.weight_zero.fill_(7.5)
            if m.act_clip is not None:
                m.act_clip.fill_(0.9025)
            if m.bias is not None:
                m.bias.zero_()
    for name, p in model.named_parameters():
        if id(p) in packed:
            continue
        if p.dim() >= 2:
            p.normal_(0.0, p[0].numel() ** -0.5)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)


class Fp8Linear(nn.Module):
    """Bench only: a `PackedLinear` run on the experimental fp8 GEMM (`qvgen_kernels.fp8_gemm`),
    weights held as e4m3 codes (one byte each). The bench's layers share one clip pair in every
    timestep bucket, so the clip is a constant here; no Φ, no input transform."""

    def __init__(self, packed: nn.Module) -> None:
        from qvgen_kernels import fp8_gemm

        super().__init__()
        self.in_features, self.act_bits = packed.in_features, packed.act_bits
        for name in ("weight_scale", "weight_zero", "weight_qsum", "bias"):  # a float parameter first:
            setattr(self, name, getattr(packed, name))  # diffusers reads a module's dtype from it
        self.w8 = nn.Parameter(fp8_gemm.fp8_weight_codes(packed.qweight, 4, packed.in_features), requires_grad=False)
        self.clip = (float(packed.act_clip[0, 0]), float(packed.act_clip[0, 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from qvgen_kernels import fp8_gemm

        lo, hi = self.clip
        return fp8_gemm.fp8_linear(
            x, self.w8, self.weight_scale, self.weight_zero, self.weight_qsum, self.bias,
            in_features=self.in_features, a_bits=self.act_bits, clip_lo=lo, clip_hi=hi,
        )  # fmt: skip


def _to_fp8_layers(net: nn.Module) -> int:
    """Swap every eligible `PackedLinear` (W≤4A≤4, rank 0, no transform) for an `Fp8Linear`."""
    from qvgen import PackedLinear

    swapped = 0
    for name, m in list(net.named_modules()):
        ok = isinstance(m, PackedLinear) and m.weight_bits <= 4 and m.act_bits is not None and m.act_bits <= 4
        if ok and m.rank == 0 and m.input_signs is None and m.smooth is None:
            net.set_submodule(name, Fp8Linear(m))
            swapped += 1
    return swapped


def build_model(model: str, variant: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Wan 2.1 with random weights: `bf16`, `w4a4` (`PackedLinear` everywhere QVGen quantizes) or
    `w4a4-fp8` (those layers on the experimental fp8 GEMM; CUDA sm_90 only)."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    from qvgen import QVGenConfig
    from qvgen.surgery import build_packed_model

    with init_empty_weights():  # parameters on meta: nothing allocated until to_empty
        net = WanTransformer3DModel(**_config(model))
    buffers = {n: b.clone() for n, b in net.named_buffers() if b.device.type != "meta"}
    nn.Module.to(net, dtype)  # nn.Module's: diffusers' own `to` warns about its fp32 modules, handled next
    keep = getattr(net, "_keep_in_fp32_modules", None) or []
    for name, module in net.named_modules():  # as diffusers' from_pretrained(torch_dtype=...) does
        if any(k in name.split(".") for k in keep):
            module.float()
    if variant.startswith("w4a4"):
        build_packed_model(net, QVGenConfig(rank=0), dtype=dtype, device="meta")
    net.to_empty(device=device)
    for n, b in buffers.items():
        net.get_buffer(n).copy_(b)
    _fill(net)
    if variant == "w4a4-fp8":
        _to_fp8_layers(net)
    return net.eval()


def weights_gib(model: nn.Module) -> float:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def set_attention(model: nn.Module, backend: str) -> None:
    model.set_attention_backend(backend)


def sdpa_kernel(model: str, tokens: int, device: torch.device, dtype: torch.dtype) -> str | None:
    """The kernel torch's SDPA picks for this model's self-attention (what `native` runs), e.g.
    FLASH_ATTENTION or CUDNN_ATTENTION; None where torch does not say."""
    cfg = _config(model)
    try:
        from torch.nn.attention import SDPBackend

        q = torch.empty(1, cfg["num_attention_heads"], tokens, cfg["attention_head_dim"], device=device, dtype=dtype)
        return SDPBackend(torch._fused_sdp_choice(q, q, q, None, 0.0, False)).name
    except Exception:  # private API: absent or changed
        return None


def time_step(model: nn.Module, case: tuple, device: torch.device, dtype: torch.dtype, reps: int, text_dim: int):
    """(median step ms, GiB the step allocates above what was in use, or None on CPU): one warm-up
    pass (autotuning, lazy init), then `reps` timed steps."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, 16, *case, generator=g).to(device, dtype)
    t = torch.tensor([500.0], device=device)
    cond = torch.randn(1, TEXT_TOKENS, text_dim, generator=g).to(device, dtype)
    uncond = torch.randn(1, TEXT_TOKENS, text_dim, generator=g).to(device, dtype)

    def step() -> None:
        for e in (cond, uncond):
            model(x, t, e, return_dict=False)

    gpu = device.type == "cuda"
    with torch.inference_mode():
        model(x, t, cond, return_dict=False)
        if gpu:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        times = []
        for _ in range(reps):
            if gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
    extra = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if gpu else None
    return statistics.median(times), extra


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_rows(args, device: torch.device, on_row=None) -> tuple[list[dict], list[dict]]:
    """All (model, case, variant, attention) rows; returns (records, skipped with reasons).

    Both variants of a model are built first and stay resident, so that a time budget cuts whole
    cases (bf16 and W4A4 alike), never one variant of a case; a row's peak is its own model's
    weights plus what the step allocates above the memory in use before it.
    """
    from .kernel_records import environment

    env = environment(device)
    dtype = torch.bfloat16
    records: list[dict] = []
    skipped: list[dict] = []
    t_start = time.perf_counter()
    for model_name in args.models:
        nets = {v: build_model(model_name, v, device, dtype) for v in args.variants}
        text_dim = _config(model_name)["text_dim"]
        for case_name in args.cases:
            case = CASES[case_name]
            for attention in ["native", *args.attention_8bit]:
                for variant, net in nets.items():
                    row = {"model": model_name, "case": case_name, "tokens": tokens_of(case), "variant": variant}
                    row["attention"] = attention
                    if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                        skipped.append({**row, "reason": f"budget of {args.budget_s}s spent"})
                        continue
                    try:
                        set_attention(net, attention)
                        ms, extra = time_step(net, case, device, dtype, args.reps, text_dim)
                    except Exception as e:  # backend not installed / not supported on this device
                        if attention == "native":
                            raise
                        skipped.append({**row, "reason": f"{type(e).__name__}: {e}"[:300]})
                        print(f"  skipped {model_name} {case_name} {variant} {attention}: {skipped[-1]['reason']}")
                        continue
                    w_gib = weights_gib(net)
                    peak = None if extra is None else w_gib + extra
                    rec = {**row, "step_ms": ms, "peak_gib": peak, "weights_gib": w_gib}
                    if attention == "native":  # name what torch runs under diffusers' `native`
                        rec["sdpa_kernel"] = sdpa_kernel(model_name, rec["tokens"], device, dtype)
                    rec.update(env, timing="events" if device.type == "cuda" else "wall")
                    records.append(rec)
                    if on_row is not None:  # e.g. save: a run stopped by a time limit keeps its rows
                        _speedups(records)
                        on_row(records, skipped)
                    print(f"  {model_name} {case_name} ({rec['tokens']} tokens) {variant} {attention}: "
                          f"{ms:.1f} ms/step, weights {w_gib:.2f} GiB", flush=True)  # fmt: skip
        del nets
        _free(device)
    _speedups(records)
    return records, skipped


def print_weights(models: list[str], variants: list[str]) -> int:
    """Weight memory of each variant, from models built on the meta device (shapes and dtypes only)."""
    meta = torch.device("meta")
    for model in models:
        sizes = {v: weights_gib(build_model(model, v, meta, torch.bfloat16)) for v in variants if v != "w4a4-fp8"}
        base = sizes.get("bf16")
        for v, gib in sizes.items():
            ratio = f" ({gib / base:.3f}× bf16)" if base else ""
            print(f"{model} {v}: weights {gib:.2f} GiB{ratio}")
    return 0


def _speedups(records: list[dict]) -> None:
    """`speedup_vs_bf16` of every row: against the bf16 row with native attention of its model and case."""
    bf16 = [r for r in records if r["variant"] == "bf16" and r["attention"] == "native"]
    base = {(r["model"], r["case"]): r["step_ms"] for r in bf16}
    for r in records:
        b = base.get((r["model"], r["case"]))
        r["speedup_vs_bf16"] = b / r["step_ms"] if b else None


def markdown(records: list[dict]) -> str:
    head = ["model", "tokens", "variant", "attention", "step ms", "× bf16", "peak GiB", "weights GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        sp = "" if r["speedup_vs_bf16"] is None else f"{r['speedup_vs_bf16']:.2f}×"
        cells = [r["model"], str(r["tokens"]), r["variant"], r["attention"], f"{r['step_ms']:.1f}", sp, peak]
        lines.append("| " + " | ".join(cells + [f"{r['weights_gib']:.2f}"]) + " |")
    return "\n".join(lines)


def _list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--models", type=_list, default=None, help="1.3b, 14b, reduced (default: GPU 1.3b,14b; CPU reduced)")
    p.add_argument(
        "--cases", type=_list, default=None, help=f"{', '.join(CASES)} (default: GPU short,480p,720p; CPU cpu)"
    )
    p.add_argument("--attention-8bit", type=_list, default=None,
                   help=f"diffusers attention backends for the 8-bit rows (default: {','.join(ATTENTION_8BIT[:1])}; "
                        "none to skip)")  # fmt: skip
    p.add_argument("--variants", type=_list, default=["bf16", "w4a4"],
                   help="bf16, w4a4, w4a4-fp8 (the experimental fp8 GEMM, sm_90); bf16 is the baseline")  # fmt: skip
    p.add_argument("--reps", type=int, default=2, help="timed steps per row (median)")
    p.add_argument("--budget-s", type=float, default=None, help="start no new row after this many seconds")
    p.add_argument("--out", default=None, metavar="PATH", help="records JSON (default docs/bench/step-<gpu>.json)")
    p.add_argument("--append", action="store_true", help="add to the records already in --out")
    p.add_argument("--weights-only", action="store_true",
                   help="print the weight memory of each variant (meta device: no GPU), then exit")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("bench step needs diffusers (pip install 'qvgen[diffusers]'); no rows measured")
        return 2
    from .kernel_records import gpu_slug

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    args.models = args.models or (["1.3b", "14b"] if gpu else ["reduced"])
    args.cases = args.cases or (["short", "480p", "720p"] if gpu else ["cpu"])
    if args.weights_only:
        return print_weights(args.models, args.variants)
    eight = args.attention_8bit if args.attention_8bit is not None else list(ATTENTION_8BIT[:1])
    args.attention_8bit = [] if eight == ["none"] else eight
    out = args.out or os.path.join("docs", "bench", f"step-{gpu_slug(device)}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    earlier = {"runs": [], "records": [], "skipped": []}
    if args.append and os.path.exists(out):  # several invocations (e.g. one per model) into one file
        with open(out) as fh:
            earlier = json.load(fh)
        if earlier.get("schema") != SCHEMA:
            raise SystemExit(f"--append: {out} holds schema {earlier.get('schema')!r}, not {SCHEMA!r}")

    def save(records: list[dict], skipped: list[dict]) -> None:
        payload = {"schema": SCHEMA, "runs": earlier["runs"] + [config], "records": earlier["records"] + records}
        payload["skipped"] = earlier["skipped"] + skipped
        with open(out, "w") as fh:
            json.dump(payload, fh, indent=2)

    t0 = time.perf_counter()
    records, skipped = run_rows(args, device, save)
    save(records, skipped)
    print()
    print(markdown(records))
    for s in skipped:
        print(f"skipped: {s}")
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    print(f"wrote {out}")
    return 0
