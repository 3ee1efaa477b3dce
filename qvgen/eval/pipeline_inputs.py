"""What `python -m qvgen.eval --pipeline` compares: the pipeline (offline), its quantized transformer, prompts."""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
from torch import nn

from .pipeline import call_default

DEFAULT_PROMPTS = (
    "a red fox running through fresh snow, cinematic lighting",
    "ocean waves breaking on dark rocks at sunset",
    "a city street at night in the rain, neon reflections",
    "a hummingbird hovering over a purple flower, slow motion",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pipeline(args: argparse.Namespace) -> Any:
    """The full-precision pipeline from a folder or the local Hub cache (never downloads); without its
    text encoder when `--prompt-embeds` replaces it."""
    from diffusers import DiffusionPipeline

    skip = {"text_encoder": None, "tokenizer": None} if args.prompt_embeds is not None else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(
            args.pipeline, torch_dtype=DTYPES[args.dtype], local_files_only=True, **skip
        )
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"--pipeline {args.pipeline}: cannot load a diffusers pipeline from this folder or the local Hub "
            f"cache (nothing is downloaded; fetch it first with `hf download {args.pipeline}`): {e}"
        ) from e
    if getattr(pipe, "transformer", None) is None or getattr(pipe, "vae", None) is None:
        raise SystemExit(f"--pipeline {args.pipeline}: {type(pipe).__name__} has no `transformer` and `vae`")
    return pipe.to(args.device)


def quantized_transformer(args: argparse.Namespace, pipe: Any) -> tuple[nn.Module, str]:
    """The checkpoint's transformer (QVGen or ComfyUI-native), or RTN W4A4 PTQ of the pipeline's."""
    from ..api import load_quantized_model
    from ..config import QVGenConfig
    from ..surgery import convert_model

    if args.checkpoint is not None:
        model = load_quantized_model(args.checkpoint, dtype=DTYPES[args.dtype], device=args.device)
        if type(model) is not type(pipe.transformer):
            raise SystemExit(
                f"--checkpoint {args.checkpoint}: holds a {type(model).__name__}, but the pipeline's transformer "
                f"is a {type(pipe.transformer).__name__}"
            )
        return model.eval(), str(args.checkpoint)
    model = copy.deepcopy(pipe.transformer)
    config = QVGenConfig(rank=0, n_buckets=10, modules_to_not_convert=args.keep)
    convert_model(model, config, progress=not args.no_progress)
    kept = f", {','.join(args.keep)} kept in full precision" if args.keep else ""
    return model.eval(), f"pipeline transformer, W4A4 round-to-nearest PTQ{kept}"


def _embeds_file(args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(args.prompt_embeds))
    pos = state.get("prompt_embeds")
    if pos is None or pos.dim() != 3:
        raise SystemExit(f"--prompt-embeds {args.prompt_embeds}: expected a (B, L, D) tensor named 'prompt_embeds'")
    neg = state.get("negative_prompt_embeds")
    if neg is not None and neg.shape != pos.shape:
        raise SystemExit(
            f"--prompt-embeds {args.prompt_embeds}: 'negative_prompt_embeds' is {tuple(neg.shape)}, "
            f"expected the shape of 'prompt_embeds', {tuple(pos.shape)}"
        )
    return {k: v.to(device, dtype) for k, v in state.items() if k in ("prompt_embeds", "negative_prompt_embeds")}


def prompt_arguments(args: argparse.Namespace, pipe: Any) -> tuple[list[dict[str, Any]], list[str] | None]:
    """Per prompt, the pipeline arguments that carry it: text for the pipeline's own encoder, or
    tensors from `--prompt-embeds` (with guidance, the file needs 'negative_prompt_embeds' too)."""
    if args.prompt_embeds is None:
        prompts = args.prompts or list(DEFAULT_PROMPTS[: args.num_prompts])
        return [{"prompt": p} for p in prompts], prompts
    state = _embeds_file(args, args.device, DTYPES[args.dtype])
    guidance = args.guidance_scale if args.guidance_scale is not None else call_default(pipe, "guidance_scale")
    if guidance is not None and guidance > 1 and "negative_prompt_embeds" not in state:
        raise SystemExit(
            f"--prompt-embeds {args.prompt_embeds}: guidance scale {guidance} needs a 'negative_prompt_embeds' "
            "tensor too (or pass --guidance-scale 1)"
        )
    n = state["prompt_embeds"].shape[0]
    return [{k: v[i : i + 1] for k, v in state.items()} for i in range(n)], None


def call_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline arguments given on the command line (the rest keep the pipeline's defaults)."""
    call: dict[str, Any] = {}
    if args.size is not None:
        call["height"], call["width"] = args.size
    for name in ("num_frames", "guidance_scale", "max_sequence_length"):
        if getattr(args, name) is not None:
            call[name] = getattr(args, name)
    return call
