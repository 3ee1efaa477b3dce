"""Widened weights: one 4-bit code per byte in GPU memory, for speed on GPUs without int4 MMA.

Hopper (H100/H200) has no int4 tensor cores: the integer GEMM widens every packed nibble to
int8 in registers, which measured ~30% slower than reading int8 codes directly (H100, Triton
3.6, Wan-sized layers; docs/benchmarks.md). Widening once at load time trades memory (weights
at ½ of bf16 instead of ¼) for that speed. Codes, scales and outputs are unchanged: the kernels
accept either layout and produce identical integers.

This is a run-time layout: save checkpoints from a model that was not widened.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels_import import qvgen_kernels
from .packed_linear import PackedLinear


@torch.no_grad()
def widen_weights(model: nn.Module) -> int:
    """Store each packed ≤4-bit `PackedLinear` weight as one code per byte; returns how many layers changed."""
    changed = 0
    for module in model.modules():
        if not isinstance(module, PackedLinear) or module.weight_bits > 4:
            continue
        q = module.qweight
        if q.shape[1] == module.in_features:
            continue
        wide = qvgen_kernels.unpack_weight(q, module.weight_bits, module.in_features)
        module.qweight = nn.Parameter(wide, requires_grad=False)
        changed += 1
    return changed
