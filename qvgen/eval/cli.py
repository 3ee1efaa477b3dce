"""`python -m qvgen.eval`: a quantized model against its full-precision original, offline.

    python -m qvgen.eval --demo                                   # the demo teacher vs its RTN W4A4 PTQ
    python -m qvgen.eval --demo --checkpoint demo-output/qvgen-demo-w4a4.safetensors
    python -m qvgen.eval --checkpoint ./wan-w4a4 --original ./Wan2.1-T2V-1.3B-Diffusers --subfolder transformer
    python -m qvgen.eval --pipeline Wan-AI/Wan2.1-T2V-1.3B-Diffusers --checkpoint ./wan-w4a4  # decoded frames

Writes `eval.json` and `eval.png` (with `--pipeline` also `frames.png`) to `--output` and prints the
per-step errors and the top layers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..demo.provenance import environment
from .plot import plot
from .run import evaluate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qvgen.eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--demo", action="store_true", help="original = the demo's teacher (pixel space: frame metrics)")
    p.add_argument(
        "--pipeline",
        help="original = this diffusers Wan/CogVideoX pipeline (folder or Hub id, offline cache): decoded frames",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="QVGen checkpoint (folder or .safetensors, or a ComfyUI-native export); --demo/--pipeline alone: RTN PTQ",
    )
    p.add_argument(
        "--keep",
        type=lambda v: v.split(","),
        default=[],
        help="RTN PTQ (no --checkpoint): layers left in full precision (fnmatch patterns, e.g. proj_out)",
    )
    p.add_argument("--original", help="full-precision diffusers model: local folder or Hub id (offline cache)")
    p.add_argument("--subfolder", default=None, help="subfolder of --original holding the transformer")
    p.add_argument("--prompts", type=lambda v: v.split(";"), help="demo or pipeline prompts, ';'-separated")
    p.add_argument("--num-prompts", type=int, default=4, help="prompts when none are given (demo: sampled captions)")
    p.add_argument(
        "--prompt-embeds",
        type=Path,
        help="safetensors file with a (B, L, D) 'prompt_embeds' tensor (--pipeline: and 'negative_prompt_embeds' "
        "for guidance; the text encoder is then not loaded)",
    )
    p.add_argument("--seeds", type=lambda v: [int(s) for s in v.split(",")], help="one per prompt (default 0, 1, …)")
    p.add_argument(
        "--steps", type=int, default=20, help="sampling steps (Euler flow matching; --pipeline: its own scheduler)"
    )
    p.add_argument("--shift", type=float, default=None, help="σ shift (default: 1 for the demo, 3 otherwise)")
    p.add_argument("--latent-shape", type=lambda v: tuple(int(s) for s in v.split(",")), help="C,F,H,W")
    p.add_argument(
        "--one-at-a-time",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="per-layer 'alone' error: one forward per layer at 3 points of the trajectory",
    )
    p.add_argument("--max-layers", type=int, help="one-at-a-time pass: only the N layers with the largest own error")
    g = p.add_argument_group("--pipeline sampling (default: the pipeline's own)")
    g.add_argument("--size", type=lambda v: tuple(int(s) for s in v.split(",")), help="H,W of the video")
    g.add_argument("--num-frames", type=int)
    g.add_argument("--guidance-scale", type=float)
    g.add_argument("--max-sequence-length", type=int, help="text tokens")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--output", type=Path, default=Path("eval-output"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def _demo_models(args: argparse.Namespace) -> tuple[nn.Module, nn.Module, str]:
    from ..api import load_quantized_model
    from ..config import QVGenConfig
    from ..demo import teacher
    from ..surgery import convert_model

    original = teacher.load_teacher()
    if args.checkpoint is not None:
        return original, load_quantized_model(args.checkpoint), str(args.checkpoint)
    quantized = copy.deepcopy(original)
    convert_model(quantized, QVGenConfig(rank=0, n_buckets=10, modules_to_not_convert=args.keep), progress=False)
    kept = f", {','.join(args.keep)} kept in full precision" if args.keep else ""
    return original, quantized.eval(), f"demo teacher, W4A4 round-to-nearest PTQ{kept}"


def _demo_prompts(args: argparse.Namespace) -> tuple[Tensor, list[str]]:
    from ..demo import shapes, text

    prompts = args.prompts or shapes.sample_captions(args.num_prompts, seed=3)
    return text.encode_prompts(prompts), prompts


def _original(args: argparse.Namespace, quantized: nn.Module) -> nn.Module:
    """The full-precision model, of the diffusers class the checkpoint was built with."""
    cls = type(quantized)
    if not hasattr(cls, "from_pretrained"):
        raise SystemExit(f"--checkpoint: model class {cls.__name__!r} is not a diffusers model class")
    kw = {"subfolder": args.subfolder} if args.subfolder else {}
    return cls.from_pretrained(args.original, torch_dtype=torch.float32, **kw).eval()


def _embeds(args: argparse.Namespace, model: nn.Module) -> Tensor:
    if args.prompt_embeds is not None:
        from safetensors.torch import load_file

        state = load_file(str(args.prompt_embeds))
        if "prompt_embeds" not in state or state["prompt_embeds"].dim() != 3:
            raise SystemExit(f"{args.prompt_embeds}: expected a (B, L, D) tensor named 'prompt_embeds'")
        return state["prompt_embeds"].float()
    dim = model.config["text_dim"]
    return torch.randn(args.num_prompts, 16, dim, generator=torch.Generator().manual_seed(1234))


def _models_and_inputs(args: argparse.Namespace) -> dict[str, Any]:
    if args.demo:
        from ..demo.teacher import DEFAULT_SHAPE

        original, quantized, label = _demo_models(args)
        embeds, prompts = _demo_prompts(args)
        shape = args.latent_shape or DEFAULT_SHAPE
        return dict(
            original=original,
            quantized=quantized,
            label=label,
            embeds=embeds,
            prompts=prompts,
            shape=shape,
            shift=1.0 if args.shift is None else args.shift,
            pixel_range=2.0,
        )
    if args.checkpoint is None or args.original is None:
        raise SystemExit("give --demo, or both --checkpoint (quantized) and --original (full precision)")
    from ..api import load_quantized_model

    quantized = load_quantized_model(args.checkpoint)
    original = _original(args, quantized)
    embeds = _embeds(args, original)
    shape = args.latent_shape or (original.config["in_channels"], 3, 16, 16)
    return dict(
        original=original,
        quantized=quantized,
        label=str(args.checkpoint),
        embeds=embeds,
        prompts=None,
        shape=shape,
        shift=3.0 if args.shift is None else args.shift,
        pixel_range=None,
    )


def _finite(obj: Any) -> Any:
    """JSON has no infinity (PSNR of identical frames): write null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def summary(result: dict[str, Any], top: int = 10) -> str:
    lines = [f"\nvelocity MSE, mean over {result['num_steps']} steps: {result['velocity_mse_mean']:.5f}"]
    if result["frames"]:
        f = result["frames"]
        lines.append(f"frames: PSNR {f['psnr_db']:.2f} dB, SSIM {f['ssim']:.4f}")
    alone = result["layers"] and "velocity_mse_alone" in result["layers"][0]
    lines += ["", "| layer | relative output error |" + (" velocity MSE, alone |" if alone else ""), "|---|---|"]
    lines[-1] += "---|" if alone else ""
    for r in result["layers"][:top]:
        cell = (
            (f" {r['velocity_mse_alone']:.2e} |" if "velocity_mse_alone" in r else " (not measured) |") if alone else ""
        )
        lines.append(f"| {r['layer']} | {r['output_rel_error']:.2e} |{cell}")
    return "\n".join(lines)


def _model_result(args: argparse.Namespace) -> dict[str, Any]:
    """The demo, or a transformer checkpoint against `--original`: run.py's own sampling loop."""
    m = _models_and_inputs(args)
    seeds = args.seeds or list(range(m["embeds"].shape[0]))
    result = evaluate(
        m["original"],
        m["quantized"],
        m["embeds"],
        seeds,
        tuple(m["shape"]),
        num_steps=args.steps,
        shift=m["shift"],
        pixel_range=m["pixel_range"],
        one_at_a_time=args.one_at_a_time,
        max_layers=args.max_layers,
        progress=not args.no_progress,
    )
    original = "demo teacher" if args.demo else args.original
    return {
        "quantized": m["label"],
        "original": original,
        "prompts": m["prompts"],
        "latent_shape": list(m["shape"]),
    } | result


def _pipeline_result(args: argparse.Namespace) -> dict[str, Any]:
    """A diffusers pipeline sampling with each transformer: decoded frames."""
    from .pipeline import evaluate_pipeline
    from .pipeline_inputs import call_arguments, load_pipeline, prompt_arguments, quantized_transformer

    if args.demo or args.original:
        raise SystemExit("--pipeline replaces --demo and --original: give one of them")
    pipe = load_pipeline(args)
    prompts, texts = prompt_arguments(args, pipe)
    quantized, label = quantized_transformer(args, pipe)
    call = call_arguments(args)
    result = evaluate_pipeline(
        pipe,
        quantized,
        prompts,
        args.seeds or list(range(len(prompts))),
        num_steps=args.steps,
        call=call,
        one_at_a_time=args.one_at_a_time,
        max_layers=args.max_layers,
        progress=not args.no_progress,
    )
    header = {"quantized": label, "original": args.pipeline, "pipeline": type(pipe).__name__, "prompts": texts}
    return header | {"pipeline_arguments": call} | result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = _pipeline_result(args) if args.pipeline else _model_result(args)
    result["environment"] = environment(sys.argv[1:] if argv is None else argv)
    first_frames = result.pop("first_frames", None)
    args.output.mkdir(parents=True, exist_ok=True)
    written = [args.output / "eval.json", plot(result, args.output / "eval.png")]
    written[0].write_text(json.dumps(_finite(result), indent=2))
    if first_frames:
        import imageio.v2 as imageio

        from .pipeline import side_by_side

        written.append(args.output / "frames.png")
        imageio.imwrite(written[-1], side_by_side(first_frames))
    print(summary(result))
    print(f"\nwrote {', '.join(str(w) for w in written)}")
    return 0
