"""`quantized_linear` as a PyTorch custom op (`torch.ops.qvgen.quantized_linear`), for torch.compile.

Why: few-token calls (time embedding, modulation, text projections) spend far more time in Python
than on the GPU (≈ 0.2 ms against ≤ 0.06 ms, docs/benchmarks.md). Registered as an opaque custom op
with a fake (shape-only) implementation, the layer can sit inside a `torch.compile(mode=
"reduce-overhead")` graph, which CUDA graphs replay without the Python. The op calls the same
`qvgen_kernels.quantized_linear`; the clip factors are tensors here (what `select_clip` gives), so
a per-timestep clip choice is data, not Python control flow. Importing this module registers it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import quantized_linear as _quantized_linear


@torch.library.custom_op("qvgen::quantized_linear", mutates_args=())
def quantized_linear_op(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    w_zero: Tensor,
    w_qsum: Tensor,
    bias: Tensor | None,
    clip_lo: Tensor,
    clip_hi: Tensor,
    phi_down: Tensor | None,
    phi_up: Tensor | None,
    input_signs: Tensor | None,
    smooth: Tensor | None,
    in_features: int,
    w_bits: int,
    a_bits: int,
    rot_block: int,
    out_dtype: torch.dtype,
    backend: str,
    act_group: int = 0,
) -> Tensor:
    """`qvgen_kernels.quantized_linear` with every argument explicit; `a_bits=0` means weight-only,
    `act_group=0` per-token activation scales (else one per group of that many inputs)."""
    return _quantized_linear(
        x, qweight, w_scale, w_zero, w_qsum, bias, in_features=in_features, w_bits=w_bits,
        a_bits=a_bits or None, clip_lo=clip_lo, clip_hi=clip_hi, phi_down=phi_down, phi_up=phi_up,
        out_dtype=out_dtype, input_signs=input_signs, rot_block=rot_block, smooth=smooth, act_group=act_group,
        backend=backend,
    )  # fmt: skip


@quantized_linear_op.register_fake
def _(x, qweight, w_scale, w_zero, w_qsum, bias, clip_lo, clip_hi, phi_down, phi_up, input_signs, smooth,
      in_features, w_bits, a_bits, rot_block, out_dtype, backend, act_group=0) -> Tensor:  # fmt: skip
    """Shape and dtype only: `x.shape[:-1] + (N,)` in `out_dtype`."""
    return x.new_empty(*x.shape[:-1], qweight.shape[0], dtype=out_dtype)
