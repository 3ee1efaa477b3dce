"""The QAT distillation loop shared by `python -m qvgen.train` and the demo.

Every random draw of step `k` comes from a generator seeded with (seed, k), so a run resumed from
its last checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..config import QVGenConfig
from ..convert import ConversionReport, convert_model, current_rank
from ..decay import RankDecaySchedule
from ..layers import QVGenLinear
from .objectives import FlowMatchingObjective, predict
from .state import (
    list_checkpoints,
    match_phi_structure,
    read_training_state,
    restore_optimizer,
    save_training_state,
)

log = logging.getLogger("qvgen.train")


@dataclass
class TrainOptions:
    """Optimisation settings; defaults are the paper's (AdamW β=(0.9, 0.95), lr 3e-5, clip lr 1e-2)."""

    output_dir: Path = Path("qvgen-output")
    steps: int = 2667
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 3e-5
    clip_lr: float = 1e-2
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int | None = None  # default: 10% of the steps
    grad_clip: float = 1.0
    caption_dropout: float = 0.05
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; or "bf16" / "no"
    gradient_checkpointing: bool | None = None  # None: on when CUDA is used
    progress: bool = True
    resume: bool = True

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"mixed_precision: expected 'auto', 'bf16' or 'no', got {self.mixed_precision!r}")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)


@dataclass
class TrainResult:
    student: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    report: ConversionReport | None = None
    resumed_from: int | None = None


class LatentDataset(Dataset):
    """In-memory (latents, text embedding) pairs; `empty_text` is the dropped-caption embedding."""

    def __init__(self, latents: list[Tensor], texts: list[Tensor], empty_text: Tensor) -> None:
        if len(latents) == 0:
            raise ValueError("the training set is empty")
        if len(latents) != len(texts):
            raise ValueError(f"{len(latents)} latents but {len(texts)} text embeddings")
        self.latents, self.texts, self.empty_text = latents, texts, empty_text

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.latents[i], self.texts[i]


def build_student(
    teacher: nn.Module, config: QVGenConfig, init: bool = True, progress: bool = True
) -> tuple[nn.Module, ConversionReport]:
    """A trainable fp32 copy of the teacher with its linear layers converted."""
    student = copy.deepcopy(teacher).float().train()
    for p in student.parameters():
        p.requires_grad_(True)
    report = convert_model(student, config, init=init, progress=progress)
    return student, report


def param_groups(student: nn.Module, opts: TrainOptions) -> list[dict[str, Any]]:
    """Weights and Φ (weight decay), quantizer scales/zeros, biases and norms (none), clip logits (own lr)."""
    decay, no_decay, clip = [], [], []
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("clip_logits"):
            clip.append(p)
        elif p.dim() >= 2 and "quantizer" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "lr": opts.lr, "weight_decay": opts.weight_decay, "name": "weights"},
        {"params": no_decay, "lr": opts.lr, "weight_decay": 0.0, "name": "quantizer_bias_norm"},
        {"params": clip, "lr": opts.clip_lr, "weight_decay": 0.0, "name": "act_clip"},
    ]


def make_optimizer(student: nn.Module, opts: TrainOptions) -> tuple[torch.optim.Optimizer, Any]:
    from diffusers.optimization import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW(param_groups(student, opts), betas=opts.betas, weight_decay=opts.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, min(opts.warmup, opts.steps), opts.steps)
    return opt, sched


def sync_optimizer_with_phi(optimizer: torch.optim.Optimizer, student: nn.Module) -> None:
    """After a rank halving: forget Adam moments of Φ (new basis); drop parameters that left the model."""
    live = {id(p) for p in student.parameters()}
    phis = {
        id(p) for m in student.modules() if isinstance(m, QVGenLinear) for p in (m.phi_down, m.phi_up) if p is not None
    }
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in phis or id(p) not in live:
                optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if id(p) in live]


def _autocast(device: torch.device, opts: TrainOptions):
    use_bf16 = opts.mixed_precision == "bf16" or (opts.mixed_precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def sample_batch(ds: LatentDataset, opts: TrainOptions, gen: torch.Generator, device) -> tuple[Tensor, Tensor]:
    idx = torch.randint(len(ds), (opts.batch_size,), generator=gen).tolist()
    latents = torch.stack([ds[i][0] for i in idx]).to(device)
    texts = torch.stack([ds[i][1] for i in idx])
    drop = torch.rand(opts.batch_size, generator=gen) < opts.caption_dropout
    texts[drop] = ds.empty_text.to(texts.dtype)
    return latents, texts.to(device)


def _resume(student, optimizer, scheduler, ckpt_dir: Path) -> int:
    ckpts = list_checkpoints(ckpt_dir)
    if not ckpts:
        return 0
    sd, opt_tensors, meta = read_training_state(ckpts[-1])
    match_phi_structure(student, sd)
    student.load_state_dict(sd)
    sync_optimizer_with_phi(optimizer, student)
    restore_optimizer(optimizer, opt_tensors, meta)
    if meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(meta["torch_rng"])
    return int(meta["step"])


def _truncate_log(path: Path, start: int) -> list[dict[str, Any]]:
    """Keep log records of steps already covered by the checkpoint we resume from."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["step"] < start]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def train(
    teacher: nn.Module,
    config: QVGenConfig,
    dataset: LatentDataset,
    opts: TrainOptions,
    *,
    objective=None,
    student: nn.Module | None = None,
    device: str | torch.device | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Distil `teacher` into a QVGen student for `opts.steps` steps (resuming when possible)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    objective = objective or FlowMatchingObjective(config.num_train_timesteps)
    teacher = teacher.to(device).eval().requires_grad_(False)
    report = None
    if student is None:
        student, report = build_student(teacher, config, progress=opts.progress)
    student.to(device).train()
    if opts.gradient_checkpointing or (opts.gradient_checkpointing is None and device.type == "cuda"):
        if hasattr(student, "enable_gradient_checkpointing"):
            student.enable_gradient_checkpointing()
    schedule = RankDecaySchedule(config.rank, config.phase_steps, config.decay_factor)
    optimizer, scheduler = make_optimizer(student, opts)
    ckpt_dir = opts.output_dir / "checkpoints"
    opts.output_dir.mkdir(parents=True, exist_ok=True)
    start = _resume(student, optimizer, scheduler, ckpt_dir) if opts.resume else 0
    log_path = opts.output_dir / "train_log.jsonl"
    history = _truncate_log(log_path, start) if start else []
    if not start:
        log_path.write_text("")
    (opts.output_dir / "train_config.json").write_text(
        json.dumps({"quantization": config.to_dict(), "options": asdict(opts)}, indent=2, default=str)
    )
    bar = tqdm(range(start, opts.steps), initial=start, total=opts.steps, desc="QVGen QAT", disable=not opts.progress)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for step in bar:
        if schedule.apply(student, step):
            sync_optimizer_with_phi(optimizer, student)
            params = [p for g in optimizer.param_groups for p in g["params"]]
        t0 = time.perf_counter()
        loss_sum = 0.0
        gen = _step_generator(opts.seed, step)
        for _ in range(opts.grad_accum):
            latents, texts = sample_batch(dataset, opts, gen, device)
            noisy = objective.make_inputs(latents, texts, gen)
            with torch.no_grad(), _autocast(device, opts):
                target = predict(teacher, noisy.inputs)
            with _autocast(device, opts):
                out = predict(student, noisy.inputs)
            loss = objective.loss(out, target, noisy.aux) / opts.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, opts.grad_clip))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"step {step}: loss is {loss_sum}; lower --lr or check the data")
        rec = {
            "step": step,
            "loss": loss_sum,
            "rank": current_rank(student),
            "grad_norm": grad_norm,
            "lr": optimizer.param_groups[0]["lr"],
            "clip_lr": optimizer.param_groups[2]["lr"],
            "sec": round(time.perf_counter() - t0, 4),
        }
        history.append(rec)
        with log_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.set_postfix(loss=f"{loss_sum:.4g}", rank=rec["rank"], gnorm=f"{grad_norm:.3g}")
        if on_step is not None:
            on_step(step, rec)
        if (step + 1) % opts.checkpoint_every == 0 or step + 1 == opts.steps:
            save_training_state(ckpt_dir, step + 1, student, optimizer, scheduler, keep=opts.keep_checkpoints)
    schedule.apply(student, opts.steps)  # Φ's state at the end (removed once the schedule ran out)
    return TrainResult(student=student.eval(), history=history, report=report, resumed_from=start or None)
