"""The QAT distillation loop shared by `python -m qvgen.train` and the demo, on one process or many.

Every random draw of step `k` comes from generators seeded with (seed, k): the step's global batch
of `batch_size × processes × grad_accum` clips is drawn first, and each clip `j` gets its own
generator (seed, k, j) for caption dropout, timestep and noise. A process takes its share of the
clips, so a run with N processes sees exactly the data of one process with an N times larger batch,
and a run resumed from its last checkpoint (on any number of processes) continues as the
uninterrupted run would have. Multi-process training: `distributed.py`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..atomic import remove_stale_temps
from ..config import QVGenConfig
from ..decay import RankDecaySchedule
from ..layers import QVGenLinear
from ..surgery import ConversionReport, convert_model, current_rank
from ..transforms import uses_smoothing
from .distributed import (
    PARALLEL_MODES,
    TEACHER_PLACEMENTS,
    Engine,
    env_flag,
    meta_student,
    mixed_precision_from_env,
)
from .interrupt import StopOnSignal, TrainingInterrupted
from .memory import MemoryEstimate, estimate_memory
from .objectives import FlowMatchingObjective, NoisyBatch, predict
from .state import (
    STEP_PREFIX,
    checkpoint_keys,
    list_checkpoints,
    match_phi_structure,
    optimizer_state,
    read_training_state,
    write_training_state,
)

log = logging.getLogger("qvgen.train")


@dataclass
class TrainOptions:
    """Optimisation settings; defaults are the paper's (AdamW β=(0.9, 0.95), lr 3e-5, clip lr 1e-2)."""

    output_dir: Path = Path("qvgen-output")
    steps: int = 2667
    batch_size: int = 1  # clips per micro-step per process; the global batch is × processes × grad_accum
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
    # several processes (torchrun / accelerate launch): see distributed.py
    parallel: str = "auto"  # auto: DDP, or what `accelerate launch`'s config asks for; "ddp", "fsdp", "zero2", "none"
    cpu_offload: bool = False  # FSDP: sharded weights, gradients and the optimizer step on the CPU
    teacher_placement: str = "auto"  # auto: "shard" under FSDP, else "device"; or "offload" (CPU, block by block)

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"mixed_precision: expected 'auto', 'bf16' or 'no', got {self.mixed_precision!r}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel: expected one of {PARALLEL_MODES}, got {self.parallel!r}")
        if self.teacher_placement not in TEACHER_PLACEMENTS:
            raise ValueError(f"teacher_placement: expected one of {TEACHER_PLACEMENTS}, got {self.teacher_placement!r}")
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
    memory: MemoryEstimate | None = None
    world_size: int = 1
    # With several processes only rank 0 gets the whole trained student (`student`); the others get
    # their wrapped shard of it. Export on the main process only.
    is_main_process: bool = True


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
    teacher: nn.Module,
    config: QVGenConfig,
    init: bool = True,
    progress: bool = True,
    calibrate: Callable[[nn.Module], None] | None = None,
) -> tuple[nn.Module, ConversionReport]:
    """A trainable fp32 copy of the teacher with its linear layers converted (`calibrate`: see convert_model)."""
    student = copy.deepcopy(teacher).float().train()
    for p in student.parameters():
        p.requires_grad_(True)
    report = convert_model(student, config, init=init, progress=progress, calibrate=calibrate)
    return student, report


CALIBRATION_CLIPS = 8


def smoothing_calibration(ds: LatentDataset, objective, opts: TrainOptions, device) -> Callable[[nn.Module], None]:
    """Forward passes over the first few training clips, one at a time, for SmoothQuant's per-channel
    input maxima; their noise comes from step −1's draws of `make_batch`, apart from training's."""

    @torch.no_grad()
    def run(model: nn.Module) -> None:
        clips = list(range(min(CALIBRATION_CLIPS, len(ds))))
        for j in clips:
            batch = make_batch(ds, objective, opts, -1, clips, range(j, j + 1), device)
            with _autocast(device, opts):
                predict(model, batch.inputs)

    return run


def param_groups(student: nn.Module, opts: TrainOptions) -> list[dict[str, Any]]:
    """Weights and Φ (weight decay), quantizer scales/zeros, biases and norms (none), clip logits (own lr)."""
    decay, no_decay, clip = [], [], []
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("clip_logits"):
            clip.append(p)
        elif p.dim() >= 2 and "quantizer" not in name and not name.endswith(("smooth_log", "rot_skew")):
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


def _sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    digest = hashlib.blake2b(f"qvgen/{seed}/{step}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def global_batch_indices(n: int, seed: int, step: int, size: int) -> list[int]:
    """Dataset indices of step `step`'s global batch (the same on every process)."""
    return torch.randint(n, (size,), generator=_step_generator(seed, step)).tolist()


def make_batch(
    ds: LatentDataset, objective, opts: TrainOptions, step: int, indices: list[int], samples: range, device
) -> NoisyBatch:
    """The noisy inputs of global-batch clips `samples`, each drawn from its own (seed, step, clip) generator."""
    parts = []
    for j in samples:
        gen = _sample_generator(opts.seed, step, j)
        latents, text = ds[indices[j]]
        if float(torch.rand((), generator=gen)) < opts.caption_dropout:
            text = ds.empty_text.to(text.dtype)
        parts.append(objective.make_inputs(latents[None].to(device), text[None].to(device), gen))
    return collate(parts)


def collate(parts: list[NoisyBatch]) -> NoisyBatch:
    """Concatenate one-clip batches: tensors along dim 0; anything else (e.g. rotary embeddings) is shared."""
    if len(parts) == 1:
        return parts[0]

    def merge(values: list[Any]) -> Any:
        v = values[0]
        return torch.cat(values) if isinstance(v, Tensor) and v.dim() > 0 else v

    return NoisyBatch(
        {k: merge([p.inputs[k] for p in parts]) for k in parts[0].inputs},
        {k: merge([p.aux[k] for p in parts]) for k in parts[0].aux},
    )


def _truncate_log(path: Path, start: int) -> list[dict[str, Any]]:
    """Keep log records of steps already covered by the checkpoint we resume from."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["step"] < start]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _init_layers_on(student: nn.Module, config: QVGenConfig, device: torch.device, progress: bool) -> None:
    """`convert_model`'s initialisation (clip search, Φ's SVD) one layer at a time on `device`, for a
    student too large to hold on the GPU before it is sharded."""
    if uses_smoothing(config.input_transform):
        warnings.warn("smoothing without calibration data: scales start at 1", stacklevel=3)
    layers = [m for m in student.modules() if isinstance(m, QVGenLinear)]
    for layer in tqdm(layers, desc="QVGen: initialising quantizers", disable=not progress):
        home = layer.weight.device
        layer.to(device).init_quantization()
        layer.to(home)


def _gradient_checkpointing(opts: TrainOptions, device: torch.device) -> bool:
    if opts.gradient_checkpointing is not None:
        return opts.gradient_checkpointing
    return device.type == "cuda" or env_flag("FSDP_ACTIVATION_CHECKPOINTING")


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
    """Distil `teacher` into a QVGen student for `opts.steps` steps (resuming when possible).

    Under `torchrun` / `accelerate launch` every process calls this with the same arguments; the
    options' `parallel` picks DDP or FSDP2 (see distributed.py). `device` None or "cuda" means this
    process's GPU.
    """
    with Engine.setup(opts.parallel, opts.cpu_offload, opts.teacher_placement, device) as engine:
        return _train(engine, teacher, config, dataset, opts, objective, student, on_step)


def _train(
    engine: Engine,
    teacher: nn.Module,
    config: QVGenConfig,
    dataset: LatentDataset,
    opts: TrainOptions,
    objective,
    student: nn.Module | None,
    on_step: Callable[[int, dict[str, Any]], None] | None,
) -> TrainResult:
    device, plan, main = engine.device, engine.plan, engine.is_main
    opts = replace(opts, mixed_precision=mixed_precision_from_env(opts.mixed_precision))
    objective = objective or FlowMatchingObjective(config.num_train_timesteps)
    ckpt_dir = opts.output_dir / "checkpoints"
    say = _say if main else (lambda *_: None)

    # where to start: rank 0 looks, everyone learns the answer
    ckpt = None
    if main:
        _tidy_output(opts, ckpt_dir, say)
        found = list_checkpoints(ckpt_dir) if opts.resume else []
        ckpt = found[-1] if found else None
    ckpt = engine.broadcast_object(ckpt)

    # the student: built and initialised once (rank 0), weightless elsewhere, then rank 0's state
    # (fresh or from the checkpoint) reaches every rank while wrapping
    on_device = plan.teacher == "device" and not plan.sharded
    if on_device:
        teacher = teacher.to(device)  # the student is then built and initialised on the GPU
    report = None
    if student is None:
        if not engine.build_on_this_rank():
            student = meta_student(lambda t: build_student(t, config, init=False, progress=False)[0], teacher)
        elif on_device:
            calib = smoothing_calibration(dataset, objective, opts, device) if ckpt is None else None
            student, report = build_student(teacher, config, init=ckpt is None, progress=opts.progress, calibrate=calib)
        else:  # a CPU copy, sharded or moved later; initialised layer by layer on the GPU
            student, report = build_student(teacher, config, init=False, progress=opts.progress)
            if ckpt is None:
                _init_layers_on(student, config, device, opts.progress)
    student.train()
    start, resume, saved, optim_sd = 0, None, None, None
    if ckpt is not None:
        if main:
            sd, opt_tensors, saved = read_training_state(ckpt)
            match_phi_structure(student, sd)
            student.load_state_dict(sd)
            del sd
        else:
            match_phi_structure(student, checkpoint_keys(ckpt))
        resume = engine.broadcast_object({k: saved[k] for k in ("step", "scheduler", "torch_rng")} if main else None)
        start = int(resume["step"])
        say(f"resuming from step {start} ({ckpt})", opts)
    checkpointing = _gradient_checkpointing(opts, device) and hasattr(student, "enable_gradient_checkpointing")
    if checkpointing:
        student.enable_gradient_checkpointing()
    memory = estimate_memory(student, teacher, plan, engine.world_size, checkpointing) if main else None
    final_copy = engine.export_copy(student)

    model = engine.wrap_student(student)
    student = engine.unwrap(model)
    teacher = engine.place_teacher(teacher)
    schedule = RankDecaySchedule(config.rank, config.phase_steps, config.decay_factor, config.final_rank)
    optimizer, scheduler = make_optimizer(student, opts)
    if ckpt is not None:
        if main:
            optim_sd = optimizer_state(opt_tensors, saved, student, optimizer)
        engine.load_optimizer(model, optimizer, optim_sd)
        del optim_sd
        if resume.get("scheduler") is not None:
            scheduler.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["torch_rng"])

    b, world = opts.batch_size, engine.world_size
    global_batch = b * world * opts.grad_accum
    log_path = opts.output_dir / "train_log.jsonl"
    history: list[dict[str, Any]] = []
    if main:
        opts.output_dir.mkdir(parents=True, exist_ok=True)
        history = _truncate_log(log_path, start) if start else []
        if not start:
            log_path.write_text("")
        (opts.output_dir / "train_config.json").write_text(
            json.dumps(
                {"quantization": config.to_dict(), "options": asdict(opts), "world_size": engine.world_size},
                indent=2,
                default=str,
            )
        )
        procs = "1 process" if world == 1 else f"{world} processes"
        say(
            f"QVGen training on {procs}: {plan.describe()}; global batch {global_batch} = {opts.batch_size} "
            f"per process × {world} × {opts.grad_accum} accumulation step(s)",
            opts,
        )
        say(str(memory), opts)
    engine.barrier()

    def save(done: int) -> Path:
        model_sd, optim_sd = engine.full_state(model, optimizer)
        if main:
            write_training_state(ckpt_dir, done, model_sd, optim_sd, scheduler.state_dict(), keep=opts.keep_checkpoints)
        engine.barrier()
        return ckpt_dir / f"{STEP_PREFIX}{done:07d}"

    show = opts.progress and main
    bar = tqdm(range(start, opts.steps), initial=start, total=opts.steps, desc="QVGen QAT", disable=not show)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    with StopOnSignal(lambda msg: say(msg, opts)) as stop:
        for step in bar:
            if engine.apply_decay(schedule, model, step):
                sync_optimizer_with_phi(optimizer, student)
                params = [p for g in optimizer.param_groups for p in g["params"]]
            t0 = time.perf_counter()
            loss_sum = 0.0
            indices = global_batch_indices(len(dataset), opts.seed, step, global_batch)
            for micro in range(opts.grad_accum):
                first = micro * b * world + engine.rank * b
                noisy = make_batch(dataset, objective, opts, step, indices, range(first, first + b), device)
                with torch.no_grad(), _autocast(device, opts):
                    target = predict(teacher, noisy.inputs)
                with engine.sync_context(model, micro == opts.grad_accum - 1):
                    with _autocast(device, opts):
                        out = predict(model, noisy.inputs)
                    loss = objective.loss(out, target, noisy.aux) / opts.grad_accum
                    loss.backward()
                loss_sum += float(loss.detach())
            grad_norm = engine.clip_grad_norm(params, opts.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum = engine.mean(loss_sum)
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
            if main:
                with log_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{loss_sum:.4g}", rank=rec["rank"], gnorm=f"{grad_norm:.3g}")
            if on_step is not None:
                on_step(step, rec)
            due = (step + 1) % opts.checkpoint_every == 0 or step + 1 == opts.steps
            if due:
                save(step + 1)
            if step + 1 < opts.steps and engine.mean(float(stop.requested)) > 0:  # all processes stop together
                path = ckpt_dir / f"{STEP_PREFIX}{step + 1:07d}" if due else save(step + 1)
                raise TrainingInterrupted(step + 1, stop.signum or signal.SIGTERM, str(path))

    final = _final_student(engine, model, student, final_copy)
    if final is not None:
        schedule.apply(final, opts.steps)  # Φ's state at the end (removed once the schedule ran out)
        final.eval()
    return TrainResult(
        student=final if final is not None else model,
        history=history,
        report=report,
        resumed_from=start or None,
        memory=memory,
        world_size=engine.world_size,
        is_main_process=main,
    )


def _final_student(engine: Engine, model: nn.Module, student: nn.Module, final_copy: nn.Module | None):
    """The trained student as a plain module: itself (one process, DDP), or rank 0's gathered copy (FSDP)."""
    if engine.plan.kind == "none":
        return student
    if engine.plan.kind == "ddp":
        if engine.is_main:
            for layer in student.modules():
                if isinstance(layer, QVGenLinear) and layer.phi_mask is not None and not layer.phi_mask.any():
                    layer.remove_phi()  # dormant Φ (see distributed.py)
            return student
        return None
    sd, _ = engine.full_state(model)
    if not engine.is_main:
        return None
    match_phi_structure(final_copy, sd)
    final_copy.load_state_dict(sd, assign=True)
    return final_copy


def _tidy_output(opts: TrainOptions, ckpt_dir: Path, say: Callable[[str, TrainOptions], None]) -> None:
    """Clear what a killed run left half-written; with `resume=False`, move an earlier run aside, never delete it."""
    for folder in (opts.output_dir, ckpt_dir):
        for p in remove_stale_temps(folder):
            say(f"removed {p.name}, left in {folder} by an interrupted write", opts)
    old_log = opts.output_dir / "train_log.jsonl"
    if opts.resume or not (list_checkpoints(ckpt_dir) or old_log.is_file()):
        return
    stamp = time.strftime("previous-run-%Y%m%d-%H%M%S")
    aside, n = opts.output_dir / stamp, 1
    while aside.exists():  # two moves in the same second
        n += 1
        aside = opts.output_dir / f"{stamp}-{n}"
    aside.mkdir(parents=True)
    for p in (ckpt_dir, old_log, opts.output_dir / "train_config.json"):
        if p.exists():
            os.replace(p, aside / p.name)
    say(f"--no-resume: the earlier run's checkpoints and log were moved to {aside}", opts)


def _say(msg: str, opts: TrainOptions) -> None:
    if opts.progress:
        tqdm.write(msg)
    else:
        log.info(msg)
