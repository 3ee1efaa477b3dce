"""Training on several GPUs or nodes with PyTorch's own engines: DDP, and FSDP2 (`fully_shard`) for sharding.

    torchrun --nproc-per-node 8 -m qvgen.train ...            # DDP
    accelerate launch --config_file fsdp.yaml -m qvgen.train  # FSDP2, as the accelerate config says

Nothing here is a training engine of its own: `Engine` picks DDP or FSDP2, wraps the student
(and shards or offloads the frozen teacher), and supplies the few collective steps the QVGen loop
needs around them. Three of those are specific to QVGen:

- Rank decay under sharding. At a phase boundary Φ's re-SVD needs whole matrices: each Φ pair is
  gathered, re-factored by `QVGenLinear.halve_phi` (the single-process code), broadcast from rank 0
  and written back shard by shard. Parameters cannot leave a wrapped model mid-run, so at rank 0 a
  Φ is left *dormant* (mask all zero: it adds exactly 0 and gets zero gradients) until the run ends
  or resumes; checkpoints and the exported model drop it, as a single process would have.
- World-size independent checkpoints. Model and optimizer states are gathered whole on rank 0 and
  keyed by parameter name (`torch.distributed.checkpoint.state_dict`), so a run resumes on any
  number of processes, one included.
- One copy of the student. With more than one process only rank 0 builds and initialises the
  student; the others build it on the meta device and receive rank 0's weights while wrapping.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate.utils import parse_flag_from_env
from torch import Tensor, nn

from ..decay import RankDecaySchedule
from ..layers import QVGenLinear
from ..surgery import STATE_ATTR
from ..timestep import attach_timestep_hook
from .state import drop_dormant_phi

log = logging.getLogger("qvgen.train")

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp", "zero2")
TEACHER_PLACEMENTS = ("auto", "device", "shard", "offload")
_NO_RESHARD = {"false", "0", "no", "shard_grad_op", "2"}
_NO_SHARD = {"no_shard", "3"}


def _env(name: str) -> str:
    return os.environ.get(name, "").strip().lower()


def env_flag(name: str) -> bool:
    """A yes/no variable of `accelerate launch`, read by accelerate's own parser (true/1/yes/on …)."""
    try:
        return parse_flag_from_env(name)
    except ValueError:
        raise ValueError(f"{name}={os.environ[name]!r}: expected a boolean (true/false, 1/0, yes/no, on/off)") from None


@dataclass(frozen=True)
class ParallelPlan:
    """How the student and the teacher are spread over the processes."""

    kind: str = "none"  # "none" | "ddp" | "fsdp"
    reshard_after_forward: bool = True  # FSDP only; False keeps weights gathered until backward (ZeRO-2)
    cpu_offload: bool = False  # FSDP only: sharded weights, gradients and the optimizer step on the CPU
    teacher: str = "device"  # "device" (a full copy per GPU) | "shard" (FSDP) | "offload" (CPU, block by block)
    source: str = "options"  # where the choice came from, for the log

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp"

    def describe(self) -> str:
        if self.kind == "fsdp":
            what = "FSDP2 full shard (ZeRO-3)" if self.reshard_after_forward else "FSDP2 shard-grad-op (ZeRO-2)"
            what += ", CPU offload" if self.cpu_offload else ""
        else:
            what = {"ddp": "DDP", "none": "single process"}[self.kind]
        return f"{what}; teacher: {self.teacher} (from {self.source})"


def resolve_plan(parallel: str, cpu_offload: bool, teacher: str, world_size: int) -> ParallelPlan:
    """The plan for `parallel` ('auto' reads `accelerate launch`'s environment), checked against the world size."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel: expected one of {PARALLEL_MODES}, got {parallel!r}")
    if teacher not in TEACHER_PLACEMENTS:
        raise ValueError(f"teacher placement: expected one of {TEACHER_PLACEMENTS}, got {teacher!r}")
    kind, reshard, source = parallel, True, "options"
    if parallel == "zero2":
        kind, reshard = "fsdp", False
    elif parallel == "auto":
        kind, reshard, offload, source = _plan_from_accelerate_env(world_size)
        cpu_offload = cpu_offload or offload
        if kind == "none" and cpu_offload:
            kind, source = "fsdp", "cpu_offload"  # offloading needs the sharded engine, even on one GPU
    if kind == "none" and world_size > 1:
        raise ValueError(f"parallel 'none' with {world_size} processes; use 'ddp', 'fsdp' or 'zero2'")
    if cpu_offload and kind != "fsdp":
        raise ValueError("cpu_offload needs sharded training (parallel 'fsdp' or 'zero2')")
    if teacher == "auto":
        teacher = "shard" if kind == "fsdp" else "device"
    if teacher == "shard" and kind != "fsdp":
        raise ValueError("teacher placement 'shard' needs sharded training (parallel 'fsdp' or 'zero2')")
    return ParallelPlan(kind, reshard, cpu_offload, teacher, source)


def _plan_from_accelerate_env(world_size: int) -> tuple[str, bool, bool, str]:
    """(kind, reshard_after_forward, cpu_offload, source) from the variables `accelerate launch` sets."""
    if env_flag("ACCELERATE_USE_FSDP"):
        strategy = _env("FSDP_RESHARD_AFTER_FORWARD") or _env("FSDP_SHARDING_STRATEGY") or "true"
        if strategy in _NO_SHARD:
            return "ddp", True, False, "accelerate config (FSDP NO_SHARD)"
        return "fsdp", strategy not in _NO_RESHARD, env_flag("FSDP_OFFLOAD_PARAMS"), "accelerate config (FSDP)"
    if env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ValueError(_deepspeed_refusal())
    return ("ddp" if world_size > 1 else "none"), True, False, "process count"


def _deepspeed_refusal() -> str:
    """Why a DeepSpeed accelerate config is refused, and the FSDP2 options that do the same job."""
    stage = int(_env("ACCELERATE_DEEPSPEED_ZERO_STAGE") or 2)
    offload = "cpu" in (_env(f"ACCELERATE_DEEPSPEED_OFFLOAD_{x}_DEVICE") for x in ("OPTIMIZER", "PARAM"))
    same = {0: "ddp", 1: "ddp", 2: "zero2"}.get(stage, "fsdp") + (" --cpu-offload" if offload and stage >= 2 else "")
    return (
        f"accelerate config: DeepSpeed (ZeRO-{stage}) is not supported; QVGen trains with PyTorch FSDP2. "
        f"Add `--parallel {same}` to the same `accelerate launch` command (the FSDP2 equivalent), "
        "or use an accelerate config with `distributed_type: FSDP` (docs/training.md)"
    )


def mixed_precision_from_env(value: str) -> str:
    """`auto` becomes bf16 when `accelerate launch` asks for bf16 (fp16 is refused: QAT needs bf16's range)."""
    env = _env("ACCELERATE_MIXED_PRECISION")
    if value != "auto" or env in ("", "no"):
        return value
    if env == "fp16":
        raise ValueError("mixed precision fp16 is not supported for QVGen training; use bf16")
    return "bf16" if env == "bf16" else value


# ---- process group ------------------------------------------------------------------------------
@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self, timeout: timedelta = timedelta(hours=24)) -> Iterator[bool]:
        """Rank 0 runs the block (yields whether this is rank 0) while the others wait for it, up to
        `timeout` rather than the process group's few minutes: encoding a dataset takes hours."""
        group = dist.new_group(backend="gloo", timeout=timeout) if self.world_size > 1 else None
        try:
            yield self.is_main
        finally:
            if group is not None:
                dist.barrier(group=group)
                dist.destroy_process_group(group)


def init_distributed(need_group: bool = False) -> DistContext:
    """Join the process group `torchrun` / `accelerate launch` describe in the environment (no-op alone).

    The group stays up for the life of the process (later calls reuse it). `need_group` makes a
    private one-process group, which DDP and FSDP need even on a single GPU; the caller destroys it.
    """
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
    if world > 1:
        dist.init_process_group(backend)
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if need_group:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return DistContext(owns_group=True)
    return DistContext()


def resolve_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """`cuda` means this process's GPU (`cuda:LOCAL_RANK`); default: CUDA when available."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


# ---- the engine ---------------------------------------------------------------------------------
class Engine:
    """DDP / FSDP2 / nothing behind one small interface used by the training loop."""

    def __init__(self, plan: ParallelPlan, ctx: DistContext, device: torch.device) -> None:
        self.plan, self.ctx, self.device = plan, ctx, device
        self._mesh = None

    @classmethod
    @contextlib.contextmanager
    def setup(cls, parallel: str, cpu_offload: bool, teacher: str, device) -> Iterator[Engine]:
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        plan = resolve_plan(parallel, cpu_offload, teacher, world)
        ctx = init_distributed(need_group=plan.kind != "none")
        engine = cls(plan, ctx, resolve_device(device, ctx.local_rank))
        try:
            yield engine
        finally:
            if ctx.owns_group and dist.is_initialized():
                dist.destroy_process_group()

    # -- process info and collectives
    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def distributed(self) -> bool:
        return self.ctx.world_size > 1

    def barrier(self) -> None:
        self.ctx.barrier()

    def broadcast_object(self, obj):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)  # NCCL needs GPU tensors
        dist.all_reduce(t)
        return float(t[0]) / self.world_size

    # -- models
    def build_on_this_rank(self) -> bool:
        """Whether this process materialises and initialises the student (others get rank 0's copy)."""
        return self.is_main or not self.distributed

    def wrap_student(self, student: nn.Module) -> nn.Module:
        """The model the loop calls: DDP or FSDP2 around `student`, with rank 0's weights on every rank."""
        kind = self.plan.kind
        if kind == "none":
            return student.to(self.device)
        if kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            _materialize(student, self.device)
            ids = [self.device.index] if self.device.type == "cuda" else None
            # The constructor syncs weights and buffers from rank 0; later buffer changes (Φ's mask)
            # are the same on every rank, so no per-step buffer broadcast.
            no_buffer_sync = {"forward_sync_buffers": False}
            if "forward_sync_buffers" not in inspect.signature(DDP).parameters:
                no_buffer_sync = {"broadcast_buffers": False}
            return DDP(student, device_ids=ids, **no_buffer_sync)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = student.state_dict() if self.is_main else {}
        # diffusers models return a view; the loop never modifies it in place, which is what this warns about
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        self._fully_shard(student, self.plan.reshard_after_forward)
        _materialize(student, "cpu" if self.plan.cpu_offload else self.device)
        set_model_state_dict(
            student, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
        )
        return student

    def place_teacher(self, teacher: nn.Module) -> nn.Module:
        teacher.eval().requires_grad_(False)
        where = self.plan.teacher
        if where == "shard":
            self._fully_shard(teacher, reshard=True)
            return teacher
        if where == "offload":
            if self.device.type != "cuda":
                return teacher.to("cpu")
            if not hasattr(teacher, "enable_group_offload"):
                raise ValueError("teacher offload needs a diffusers model (enable_group_offload)")
            teacher.enable_group_offload(
                onload_device=self.device,
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=True,
            )
            return teacher
        return teacher.to(self.device)

    def _fully_shard(self, model: nn.Module, reshard: bool) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        try:
            from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
        except ImportError:
            raise RuntimeError(f"sharded training needs torch>=2.6 (FSDP2), this is {torch.__version__}") from None

        if self._mesh is None:
            self._mesh = init_device_mesh(self.device.type, (self.world_size,))
        kw = {"mesh": self._mesh, "reshard_after_forward": reshard}
        if self.plan.cpu_offload:
            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        for block in transformer_blocks(model):
            fully_shard(block, **kw)
        fully_shard(model, **kw)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return model.module if isinstance(model, DDP) else model

    # -- the step
    def sync_context(self, model: nn.Module, last_micro_step: bool):
        """DDP: skip the gradient all-reduce on all but the last micro-step. FSDP reduce-scatters every
        micro-step (accumulating unsharded gradients would cost a full gradient copy per GPU)."""
        if self.plan.kind == "ddp" and not last_micro_step:
            return model.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    # -- rank decay
    @torch.no_grad()
    def apply_decay(self, schedule: RankDecaySchedule, model: nn.Module, step: int) -> bool:
        """`schedule.apply` on a wrapped model: gathered re-SVD, dormant Φ instead of removal."""
        inner = self.unwrap(model)
        if self.plan.kind == "none":
            return schedule.apply(inner, step)
        rank, changed = schedule.rank_at(step), False
        for layer in inner.modules():
            if not isinstance(layer, QVGenLinear) or layer.phi_mask is None:
                continue
            n = layer.phi_mask.numel()
            target = min(rank, n)
            if layer.rank > target:
                changed = True
                if target > 0:
                    self._halve(layer, target)
            layer.phi_mask.copy_(schedule.mask_at(step, n).to(layer.phi_mask.device))
        return changed

    def _halve(self, layer: QVGenLinear, rank: int) -> None:
        names = ("phi_down", "phi_up")
        sharded = {n: layer._parameters[n] for n in names}
        for n in names:  # whole matrices on the mask's device, where `halve_phi` computes
            p = sharded[n]
            full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
            layer._parameters[n] = nn.Parameter(full.to(layer.phi_mask.device).clone())
        try:
            layer.halve_phi(rank)
            new = {n: layer._parameters[n].detach() for n in names}
        finally:
            layer._parameters.update(sharded)
        for n in names:
            full = new[n].cpu() if dist.get_backend() == "gloo" else new[n]
            dist.broadcast(full, src=0)  # the same Φ on every rank, whatever the local SVD said
            _write_full(sharded[n], full)

    # -- checkpoints and the final model
    def full_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> tuple[dict[str, Tensor] | None, dict | None]:
        """Whole model (and optimizer) state keyed by name, on rank 0 (None elsewhere); dormant Φ left out."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(model, options=options)
        osd = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
        if not self.is_main:
            return None, None
        sd = {k: v.detach().cpu() for k, v in sd.items()}
        drop_dormant_phi(sd, osd)
        return sd, osd

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None) -> None:
        """Load a name-keyed full optimizer state held by rank 0 into every rank's (sharded) optimizer."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.distributed)
        set_optimizer_state_dict(model, optimizer, state if self.is_main else {}, options=options)

    def export_copy(self, student: nn.Module) -> nn.Module | None:
        """Before sharding (rank 0): a weightless copy of `student` to load the gathered final state into."""
        if not (self.plan.sharded and self.is_main):
            return None
        return meta_copy(student)


# ---- helpers ------------------------------------------------------------------------------------
def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: diffusers' `_no_split_modules`, else ModuleList items."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if not blocks:
        blocks = [m for ml in model.modules() if isinstance(ml, nn.ModuleList) for m in ml]
    return blocks


def _weightless(model: nn.Module) -> nn.Module:
    """`copy.deepcopy` with every parameter on the meta device (buffers, small, are copied)."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def meta_copy(model: nn.Module) -> nn.Module:
    """A weightless copy of a converted model, to `load_state_dict(..., assign=True)` into."""
    out = _weightless(model)
    state = getattr(out, STATE_ATTR, None)
    if state is not None:  # the copied hook would still feed the original's timestep state
        attach_timestep_hook(out, state)
    return out


def meta_student(build, teacher: nn.Module) -> nn.Module:
    """`build(teacher)` run on a weightless copy of the teacher: the student's structure, no memory."""
    return build(_weightless(teacher))


def _materialize(model: nn.Module, device) -> None:
    """Give meta parameters real (uninitialised) storage, keeping the buffers that are already real."""
    if not any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model.to(device)
        return
    keep = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n in keep:
                b.copy_(keep[n])


def _write_full(param: Tensor, full: Tensor) -> None:
    """Copy a whole tensor into `param`, or into this rank's Shard(0) piece of it."""
    with torch.no_grad():
        if not hasattr(param, "to_local"):
            param.copy_(full.to(param.device))
            return
        local = param.to_local()
        rank, world = param.device_mesh.get_local_rank(), param.device_mesh.size()
        pieces = torch.chunk(full, world, dim=0)  # FSDP2's Shard(0) layout
        if rank < len(pieces) and local.numel():
            local.copy_(pieces[rank].to(local.device))
