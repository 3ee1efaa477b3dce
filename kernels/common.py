"""Argument handling shared by the backends: flattening, per-row clip factors, checks."""

from __future__ import annotations

import torch
from torch import Tensor

SCALE_MIN = 1e-5  # the training quantizer's floor on the activation scale (qvgen.quantizers.SCALE_MIN)

ClipArg = Tensor | float


def check_act_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be an int in 2..8, got {bits!r}")
    return 2**bits - 1


def row_factors(clip: ClipArg, lead_shape: torch.Size, device: torch.device) -> Tensor:
    """A clip factor as one float32 per row of the flattened input, shape (M,).

    Accepted: a Python number or 0-d tensor (whole batch), a tensor broadcastable to the
    input's leading shape `x.shape[:-1]` (per token, or e.g. (B, 1) per sample for a (B, L, K)
    input), or one shaped like the per-token statistics `x.shape[:-1] + (1,)`.
    """
    m = 1
    for d in lead_shape:
        m *= d
    if not isinstance(clip, Tensor):
        return torch.full((m,), float(clip), dtype=torch.float32, device=device)
    c = clip.detach().to(device=device, dtype=torch.float32)
    if c.dim() == len(lead_shape) + 1 and c.shape[-1] == 1:
        c = c.squeeze(-1)
    try:
        c = c.broadcast_to(lead_shape)
    except RuntimeError as e:
        raise ValueError(
            f"clip factors of shape {tuple(clip.shape)} do not broadcast to the input's per-token "
            f"shape {tuple(lead_shape)} (or {tuple(lead_shape) + (1,)})"
        ) from e
    return c.reshape(m).contiguous()


def check_linear_args(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    w_zero: Tensor,
    w_qsum: Tensor,
    bias: Tensor | None,
    in_features: int,
    w_bits: int,
    a_bits: int | None,
    phi_down: Tensor | None,
    phi_up: Tensor | None,
) -> None:
    """Shape and dtype checks with messages that name the offending argument."""
    from .packing import packed_width

    if not 2 <= w_bits <= 8:
        raise ValueError(f"w_bits must be in 2..8, got {w_bits}")
    if a_bits is not None:
        check_act_bits(a_bits)
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects in_features={in_features}")
    if not x.is_floating_point():
        raise ValueError(f"input must be a float tensor, got {x.dtype}")
    n = qweight.shape[0]
    width = packed_width(in_features, w_bits)
    if qweight.dtype != torch.uint8 or tuple(qweight.shape) != (n, width):
        raise ValueError(f"qweight must be uint8 of shape (N, {width}), got {qweight.dtype} {tuple(qweight.shape)}")
    for name, t in (("w_scale", w_scale), ("w_zero", w_zero), ("w_qsum", w_qsum)):
        if t.numel() != n:
            raise ValueError(f"{name} must have {n} entries (one per output channel), got {tuple(t.shape)}")
    if w_qsum.is_floating_point():
        raise ValueError(f"w_qsum must be an integer tensor, got {w_qsum.dtype}")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias must have {n} entries, got {tuple(bias.shape)}")
    if (phi_down is None) != (phi_up is None):
        raise ValueError("phi_down and phi_up come together (both or neither)")
    if phi_down is not None:
        r = phi_down.shape[0]
        if tuple(phi_down.shape) != (r, in_features) or tuple(phi_up.shape) != (n, r):
            raise ValueError(
                f"phi_down must be (r, {in_features}) and phi_up ({n}, r); got {tuple(phi_down.shape)} "
                f"and {tuple(phi_up.shape)}"
            )
