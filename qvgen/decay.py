"""Rank decay of Φ: cosine fade of the lower half within a phase, re-SVD and halving at its end.

With rank 32, λ = 1/2 and phase length T the ranks run 32 → 16 → 8 → 4 → 2 → 1 → 0 over six
phases; from step `6·T` on Φ is gone and the layer is plain W4A4. Everything here is a pure
function of the step, so a resumed run lands on exactly the same masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .layers import QVGenLinear


@dataclass(frozen=True)
class RankDecaySchedule:
    """`final_rank` > 0 stops the decay there (e.g. 32 → 16 → 8 and 8 kept): Φ ships as a low-rank branch."""

    initial_rank: int = 32
    phase_steps: int = 444
    factor: float = 0.5
    final_rank: int = 0

    @property
    def phase_ranks(self) -> list[int]:
        """Rank at the start of each phase: [32, 16, 8, 4, 2, 1] for the defaults ([32, 16] for final rank 8)."""
        ranks, r = [], self.initial_rank
        while r > self.final_rank:
            ranks.append(r)
            r = max(int(r * self.factor), self.final_rank)
        return ranks

    @property
    def total_steps(self) -> int:
        """Step from which Φ has its final rank."""
        return len(self.phase_ranks) * self.phase_steps

    def phase(self, step: int) -> tuple[int, int]:
        """(phase index, step within the phase)."""
        return step // self.phase_steps, step % self.phase_steps

    def rank_at(self, step: int) -> int:
        """Components alive (mask > 0) at `step`."""
        p, _ = self.phase(step)
        ranks = self.phase_ranks
        return ranks[p] if p < len(ranks) else min(self.final_rank, self.initial_rank)

    def kept_at(self, step: int) -> int:
        """Components that survive the current phase (the upper half)."""
        p, _ = self.phase(step)
        ranks = self.phase_ranks
        return ranks[p + 1] if p + 1 < len(ranks) else min(self.final_rank, self.initial_rank)

    def alpha(self, k: int) -> float:
        """Cosine fade factor `(1 + cos(π k / T)) / 2` of the lower half at step k of a phase."""
        return (1.0 + math.cos(math.pi * k / self.phase_steps)) / 2.0

    def mask_at(self, step: int, size: int | None = None) -> torch.Tensor:
        """Mask over `size` (default: initial rank) components at `step`."""
        size = self.initial_rank if size is None else size
        rank, kept = self.rank_at(step), self.kept_at(step)
        m = torch.zeros(size)
        m[: min(kept, size)] = 1.0
        if rank > kept and kept < size:
            m[kept : min(rank, size)] = self.alpha(self.phase(step)[1])
        return m

    @torch.no_grad()
    def apply(self, model: nn.Module, step: int) -> bool:
        """Bring every Φ of `model` to the state of `step`; True when any rank was halved."""
        rank = self.rank_at(step)
        changed = False
        for layer in model.modules():
            if not isinstance(layer, QVGenLinear) or layer.phi_mask is None:
                continue
            target = min(rank, layer.phi_mask.numel())
            if layer.rank > target:
                layer.halve_phi(target)
                changed = True
            if layer.phi_mask is not None:
                layer.phi_mask.copy_(self.mask_at(step, layer.phi_mask.numel()).to(layer.phi_mask.device))
        return changed
