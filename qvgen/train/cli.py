"""`python -m qvgen.train`: QAT distillation of a diffusers video transformer into a QVGen checkpoint.

    python -m qvgen.train --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --data ./clips --output ./wan-w4a4

Runs three stages, each skipped when already done, so re-running the same command resumes:
prepare (encode the clips once), train (checkpoints every N steps), export (packed checkpoint).
The same command runs on several GPUs or nodes under `torchrun` or `accelerate launch` (docs/training.md).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

import torch

from ..api import save_quantized
from ..config import SCHEMES, QVGenConfig
from ..decay import RankDecaySchedule
from ..eval.sensitivity import parse_act8_layers
from ..quantizers import ZERO_POINT_GRADS
from ..schemes import get_scheme
from ..transforms import TRANSFORMS
from .act8 import ACT8_FILE, measure_act8_layers, with_act8_layers
from .data import DataError
from .distributed import PARALLEL_MODES, TEACHER_PLACEMENTS, init_distributed
from .interrupt import TrainingInterrupted
from .prepare import CachedLatentDataset, detect_family, load_teacher, make_objective, prepare
from .trainer import TrainOptions, train

DEFAULT_TEXT_LEN = {"wan": 512, "cogvideox": 226}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qvgen.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="teacher: diffusers pipeline id on the Hub or a local folder")
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --model")
    g.add_argument("--data", help="folder of videos with captions (metadata.jsonl/.csv or sidecar .txt)")
    g.add_argument("--cache", type=Path, help="encoded-dataset folder (default: OUTPUT/cache)")
    g.add_argument("--output", type=Path, default=Path("qvgen-output"), help="run folder: log, checkpoints, export")
    g.add_argument("--num-frames", type=int, default=49, help="frames per clip (Wan: 4k+1, CogVideoX: 8k+1)")
    g.add_argument("--height", type=int, default=480)
    g.add_argument("--width", type=int, default=832, help="832 for Wan, 720 for CogVideoX in the paper")
    g.add_argument("--frame-stride", type=int, default=1, help="take every n-th frame")
    g.add_argument("--max-text-len", type=int, default=None, help="text tokens (default: 512 Wan, 226 CogVideoX)")
    g.add_argument("--prepare-only", action="store_true", help="encode the dataset and stop")

    q = p.add_argument_group("quantization")
    q.add_argument(
        "--scheme",
        choices=list(SCHEMES),
        default="qvgen",
        help="qvgen: the paper's W/A quantizers, packed QVGen checkpoint; convrot_w4a4: ComfyUI's native ConvRot "
        "arithmetic (Hadamard-256 rotation, symmetric int4 per row and per token); nvfp4: ComfyUI's NVFP4 (e2m1 "
        "with fp8 scales per 16 elements, FP4 tensor cores on RTX 50 / B200); svdquant_w4a4: comfy-kitchen's "
        "SVDQuant W4A4 (int4 groups of 64, smoothing, Φ kept at --final-rank as its low-rank branch); w4a8_int8: "
        "comfy-kitchen's grouped codebook W4A8 (ComfyUI format asym_w4a8_int8, int8 tokens); all but qvgen are "
        "exported as one ComfyUI .safetensors file (docs/comfyui.md) plus the same tensors as a diffusers "
        "transformer folder (docs/diffusers.md)",
    )
    q.add_argument(
        "--input-transform",
        choices=TRANSFORMS,
        default=None,
        help="per-layer input transform against activation error (default: smooth for --scheme qvgen, the best "
        "measured on the demo, and svdquant_w4a4, whose format has it; none for convrot_w4a4, nvfp4 and "
        "w4a8_int8, which ComfyUI runs without one or which rotate by themselves)",
    )
    q.add_argument("--smooth-alpha", type=float, default=QVGenConfig.smooth_alpha, help="SmoothQuant strength")
    q.add_argument(
        "--zero-point-grad",
        choices=ZERO_POINT_GRADS,
        default=QVGenConfig.zero_point_grad,
        help="clip logits' gradient through the activation zero point's rounding: ste, or none as the authors' code "
        "(docs/training.md)",
    )
    q.add_argument(
        "--act-group-size",
        type=int,
        default=None,
        help="one activation scale per this many input features of a token (e.g. 64, 128; default: per token); "
        "the triton backend runs per token only (README, 'Per-group activation quantization')",
    )
    q.add_argument(
        "--act8-layers",
        type=parse_act8_layers,
        default=None,
        metavar="auto:N|PATTERNS",
        help="8-bit inputs on some layers (per-layer mixed precision, --scheme qvgen): auto:N picks the N layers "
        "whose round-to-nearest quantization alone costs the teacher the most on the first training clips (one "
        "forward pass per layer and clip; the pick is kept in OUTPUT/act8_layers.json), or comma-separated "
        "fnmatch patterns (e.g. proj_out)",
    )
    q.add_argument(
        "--train-transform",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="learn the smoothing scales during QAT",
    )
    q.add_argument(
        "--smooth-buckets",
        type=int,
        default=QVGenConfig.smooth_buckets,
        help="experiment, not exportable: smoothing scales per this many groups of timestep buckets (README, "
        "'Timestep-dependent smoothing and learned rotations')",
    )
    q.add_argument(
        "--learned-rotation",
        type=int,
        default=QVGenConfig.learned_rotation,
        help="experiment, not exportable: learn a block-diagonal rotation of this block size after the Hadamard "
        "(needs --input-transform hadamard or smooth_hadamard; 0: off)",
    )
    q.add_argument("--weight-bits", type=int, default=4)
    q.add_argument(
        "--act-bits",
        type=int,
        default=None,
        help="0 for weight-only quantization (default 4; w4a8_int8: 8; convrot_w4a4: 4, or 8 for int8 tokens)",
    )
    q.add_argument("--rank", type=int, default=32, help="initial rank of the auxiliary module Φ (0: plain QAT)")
    q.add_argument(
        "--final-rank",
        type=int,
        default=0,
        help="rank Φ decays to and keeps (svdquant_w4a4: shipped as its proj_down/proj_up branch; 0 elsewhere)",
    )
    q.add_argument("--decay-factor", type=float, default=0.5, help="rank multiplier at each phase boundary")
    q.add_argument("--phase-steps", type=int, default=None, help="steps per decay phase (default: Φ ends at rank 0)")
    q.add_argument("--buckets", type=int, default=50, help="timestep buckets for activation clipping")
    q.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave layers matching this fnmatch pattern in full precision (repeatable)",
    )

    o = p.add_argument_group("optimisation (paper defaults)")
    o.add_argument("--steps", type=int, default=2667)
    o.add_argument("--batch-size", type=int, default=1, help="clips per step per device")
    o.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation micro-steps")
    o.add_argument("--lr", type=float, default=3e-5, help="weights, Φ and quantizer scales")
    o.add_argument("--clip-lr", type=float, default=1e-2, help="activation clipping logits")
    o.add_argument("--weight-decay", type=float, default=1e-4)
    o.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --steps")
    o.add_argument("--grad-clip", type=float, default=1.0)
    o.add_argument("--caption-dropout", type=float, default=0.05)
    o.add_argument("--mixed-precision", choices=["auto", "bf16", "no"], default="auto")
    o.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA"
    )
    o.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds every random draw (Φ init, Hadamard signs, data order, noise, dropout)",
    )

    d = p.add_argument_group("several GPUs (launch with torchrun or accelerate launch)")
    d.add_argument(
        "--parallel",
        choices=PARALLEL_MODES,
        default="auto",
        help="auto: DDP, or FSDP/ZeRO-2 when the accelerate config asks; zero2: FSDP2 keeping weights gathered "
        "from forward to backward",
    )
    d.add_argument("--cpu-offload", action="store_true", help="FSDP: weights, gradients, optimizer step on the CPU")
    d.add_argument(
        "--teacher-placement",
        choices=TEACHER_PLACEMENTS,
        default="auto",
        help="frozen teacher: auto (shard under FSDP, else device), device, shard, offload (CPU, block by block)",
    )

    r = p.add_argument_group("checkpoints and export")
    r.add_argument("--checkpoint-every", type=int, default=200)
    r.add_argument("--keep-checkpoints", type=int, default=2)
    r.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --output")
    r.add_argument(
        "--export-dtype",
        choices=["bf16", "fp16", "fp32"],
        default="bf16",
        help="dtype of the tensors kept in full precision",
    )
    r.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the export (token from HF_TOKEN or the HF login)")
    r.add_argument("--private", action="store_true", help="create the Hub repository as private")
    r.add_argument("--device", default=None, help="default: cuda when available")
    r.add_argument("--no-progress", action="store_true")
    return p


def quant_config(args: argparse.Namespace) -> QVGenConfig:
    n_phases = len(RankDecaySchedule(args.rank, 1, args.decay_factor, args.final_rank).phase_ranks) or 1
    phase = args.phase_steps or max(1, math.floor(args.steps / n_phases))
    transform = args.input_transform or ("smooth" if args.scheme in ("qvgen", "svdquant_w4a4") else "none")
    act_bits = args.act_bits if args.act_bits is not None else (8 if args.scheme == "w4a8_int8" else 4)
    return QVGenConfig(
        weight_bits=args.weight_bits,
        act_bits=act_bits or None,
        rank=args.rank,
        final_rank=args.final_rank,
        decay_factor=args.decay_factor,
        phase_steps=phase,
        n_buckets=args.buckets,
        modules_to_not_convert=list(args.skip),
        scheme=args.scheme,
        input_transform=transform,
        smooth_alpha=args.smooth_alpha,
        train_transform=args.train_transform and transform != "none",
        transform_seed=args.seed,
        zero_point_grad=args.zero_point_grad,
        act_group_size=args.act_group_size,
        layer_act_bits=args.act8_layers.layer_act_bits() if args.act8_layers else {},
        smooth_buckets=args.smooth_buckets,
        learned_rotation=args.learned_rotation,
    )


def export_path(args: argparse.Namespace) -> Path:
    """Where the export goes: the `transformer` folder, or ComfyUI's single file for its native schemes
    (which also leave the same tensors as a diffusers `transformer` folder next to it)."""
    if get_scheme(args.scheme).file_format == "comfy":
        return args.output / "comfyui" / f"diffusion_model_{args.scheme}.safetensors"
    return args.output / "transformer"


def train_options(args: argparse.Namespace) -> TrainOptions:
    return TrainOptions(
        output_dir=args.output,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        clip_lr=args.clip_lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        caption_dropout=args.caption_dropout,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        progress=not args.no_progress,
        resume=not args.no_resume,
        parallel=args.parallel,
        cpu_offload=args.cpu_offload,
        teacher_placement=args.teacher_placement,
    )


def run(args: argparse.Namespace) -> Path:
    qconfig = quant_config(args)  # validate settings before any heavy work
    if args.push_to_hub and (qconfig.smooth_buckets > 1 or qconfig.learned_rotation):
        raise ValueError("--push-to-hub: --smooth-buckets / --learned-rotation models cannot be exported")
    opts = train_options(args)
    family = detect_family(args.model, args.revision)
    cache = args.cache or args.output / "cache"
    ctx = init_distributed()  # several processes: rank 0 prepares and exports, all train
    with ctx.main_first() as main:
        if args.data and main:
            prepare(
                args.model,
                args.data,
                cache,
                num_frames=args.num_frames,
                height=args.height,
                width=args.width,
                max_text_len=args.max_text_len or DEFAULT_TEXT_LEN[family],
                frame_stride=args.frame_stride,
                revision=args.revision,
                device=args.device,
                progress=not args.no_progress,
            )
    if not args.data and not Path(cache).is_dir():
        raise DataError(f"{cache}: no encoded dataset; pass --data with a folder of captioned videos")
    if args.prepare_only:
        return Path(cache)
    dataset = CachedLatentDataset(cache)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    teacher = load_teacher(args.model, family, torch.bfloat16 if cuda else torch.float32, args.revision)
    objective = make_objective(args.model, family, teacher, args.revision)
    if args.act8_layers and args.act8_layers.auto:
        n = args.act8_layers.auto
        with ctx.main_first() as main:  # rank 0 measures (or finds an earlier run's pick), the others wait
            if main:
                measure_act8_layers(teacher, qconfig, dataset, objective, opts, n, args.device)
        qconfig = with_act8_layers(qconfig, opts.output_dir / ACT8_FILE, n)
    result = train(teacher, qconfig, dataset, opts, objective=objective, device=args.device)
    if not result.is_main_process:
        return export_path(args)
    if qconfig.smooth_buckets > 1 or qconfig.learned_rotation:
        print(
            f"{args.output}: smooth_buckets / learned_rotation are training-only experiments the packed format "
            "cannot hold; the training checkpoint is kept there, nothing was exported"
        )
        return args.output
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.export_dtype]
    if get_scheme(qconfig.scheme).file_format == "comfy":
        from ..adapters.comfy.native import export_comfy

        report = export_comfy(result.student, qconfig, export_path(args), dtype=dtype)
        logging.getLogger("qvgen.train").info("%s", report)
        print(f"ComfyUI {qconfig.scheme} checkpoint written to {report.path} (load it with 'Load Diffusion Model')")
        print(report)
        folder = save_quantized(result.student, qconfig, args.output / "transformer", dtype=dtype)
        print(f"diffusers folder of the same tensors written to {folder} (WanTransformer3DModel.from_pretrained)")
        export = report.path
    else:
        export = save_quantized(result.student, qconfig, export_path(args), dtype=dtype)
        logging.getLogger("qvgen.train").info("exported %s", export)
        print(f"QVGen checkpoint written to {export}")
    if args.push_to_hub:
        _push(args, export)
    return export


def _push(args: argparse.Namespace, export: Path) -> None:
    from ..hub import HubError, push_training_output

    try:
        push_training_output(args.output, args.push_to_hub, base_model=args.model, private=args.private)
    except HubError as e:  # the export is on disk; only the upload failed
        raise ValueError(f"--push-to-hub: {e}; the checkpoint is in {export}, push it later with qvgen.hub") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    try:
        run(args)
    except TrainingInterrupted as e:
        print(f"{e}")
        return e.exit_code
    except (DataError, ValueError) as e:
        print(f"error: {e}")
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
