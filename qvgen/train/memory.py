"""The memory estimate printed before the first training step: what each process holds, and where.

Counted from the parameters alone (they may still be on the meta device): fp32 master weights,
their gradients, AdamW's two moments, the frozen teacher, and what FSDP gathers transiently.
Activations depend on the clip size and on gradient checkpointing and are not included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class MemoryEstimate:
    """Bytes per process by item; `where` is 'device' or 'host'."""

    world_size: int
    plan: str
    rows: list[tuple[str, float, str]] = field(default_factory=list)
    note: str = ""

    def total(self, where: str = "device") -> float:
        return sum(b for _, b, w in self.rows if w == where)

    def __str__(self) -> str:
        width = max(len(r[0]) for r in self.rows) if self.rows else 10
        procs = "1 process" if self.world_size == 1 else f"{self.world_size} processes"
        lines = [f"Memory estimate per process ({procs}):"]
        lines += [f"  {what:<{width}}  {format_bytes(b):>11}  {where}" for what, b, where in self.rows]
        lines.append(
            f"  total: {format_bytes(self.total('device'))} on the device, {format_bytes(self.total('host'))} "
            f"on the host, plus activations{self.note}"
        )
        return "\n".join(lines)


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _largest_block(model: nn.Module) -> int:
    from .distributed import transformer_blocks

    return max((_bytes(b.parameters()) for b in transformer_blocks(model)), default=0)


def estimate_memory(
    student: nn.Module, teacher: nn.Module, plan, world_size: int, gradient_checkpointing: bool
) -> MemoryEstimate:
    """Estimate for `plan` (a `distributed.ParallelPlan`) before the student is wrapped."""
    shard = world_size if plan.sharded else 1
    state_where = "host" if plan.cpu_offload else "device"
    trainable = [p for p in student.parameters() if p.requires_grad]
    weights = _bytes(student.parameters())
    n_train = sum(p.numel() for p in trainable)
    sharded = f" / {shard} ranks" if shard > 1 else ""
    rows = [
        (f"student weights (fp32{sharded})", weights / shard, state_where),
        (f"gradients (fp32{sharded})", n_train * 4 / shard, state_where),
        (f"AdamW moments (2 × fp32{sharded})", n_train * 8 / shard, state_where),
    ]
    if plan.sharded and not plan.reshard_after_forward:
        rows.append(("weights kept gathered, forward → backward", weights * (1 - 1 / shard), "device"))
    elif plan.sharded:
        rows.append(("gathered blocks (2 in flight)", 2 * _largest_block(student), "device"))
    t_bytes = _bytes(teacher.parameters())
    t_dtype = str(next(teacher.parameters()).dtype).replace("torch.", "") if t_bytes else "-"
    if plan.teacher == "shard":
        rows.append((f"teacher ({t_dtype} / {world_size} ranks)", t_bytes / world_size, state_where))
        rows.append(("teacher gathered block", _largest_block(teacher), "device"))
    elif plan.teacher == "offload":
        rows.append((f"teacher ({t_dtype}, offloaded)", t_bytes, "host"))
        rows.append(("teacher block on the device", _largest_block(teacher), "device"))
    else:
        rows.append((f"teacher ({t_dtype})", t_bytes, "device"))
    note = f" (gradient checkpointing {'on' if gradient_checkpointing else 'off'})"
    return MemoryEstimate(world_size, plan.describe(), rows, note)
