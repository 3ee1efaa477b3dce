"""Argument handling shared by the backends: flattening, per-row clip factors, checks."""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCALE_MIN = 1e-5  # the training quantizer's floor on the activation scale (qvgen.quantizers.SCALE_MIN)

ClipArg = Tensor | float


def exact_div(a: Tensor, d: float) -> Tensor:
    """`a / d` rounded as IEEE division on every device.

    CUDA PyTorch turns division by a Python scalar into a multiplication by its reciprocal
    (up to one ulp off), while CPU PyTorch and the Triton kernels (`div_rn`) divide exactly;
    a divisor tensor on a's device keeps the quantizer's scales bit-identical everywhere.
    """
    if a.dtype != torch.float32 or a.device.type == "cpu":
        return a / d
    return a / torch.full((), d, dtype=a.dtype, device=a.device)


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
    if qweight.dtype != torch.uint8 or tuple(qweight.shape) not in ((n, width), (n, in_features)):
        raise ValueError(
            f"qweight must be uint8 of shape (N, {width}) (packed) or (N, {in_features}) (widened), "
            f"got {qweight.dtype} {tuple(qweight.shape)}"
        )
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


# ---------------------------------------------------------------------------------------------
# Input transform: x' = fwht(x · signs, block) / smooth, applied before per-token quantization
# ---------------------------------------------------------------------------------------------
MAX_ROT_BLOCK = 256


def check_transform(
    k: int, input_signs: Tensor | None, rot_block: int, smooth: Tensor | None, device: torch.device
) -> tuple[Tensor | None, int, Tensor | None]:
    """Validated transform arguments as (signs float32 (K,) or None, block, smooth float32 (K,) or None).

    `rot_block=0` means no rotation (then `input_signs` must be None); otherwise it is a power of
    two ≤ 256 dividing K, and `input_signs` (±1, int8 or float, shape (K,)) is required.
    """
    if not isinstance(rot_block, int) or rot_block < 0:
        raise ValueError(f"rot_block must be a non-negative int, got {rot_block!r}")
    if rot_block == 0:
        if input_signs is not None:
            raise ValueError("input_signs needs rot_block > 0 (the Hadamard block size)")
        signs = None
    else:
        if rot_block & (rot_block - 1) or rot_block > MAX_ROT_BLOCK:
            raise ValueError(f"rot_block must be a power of two ≤ {MAX_ROT_BLOCK}, got {rot_block}")
        if k % rot_block:
            raise ValueError(f"rot_block={rot_block} does not divide the {k} input features")
        if input_signs is None:
            raise ValueError("rot_block > 0 needs input_signs (±1 per input feature)")
        if input_signs.numel() != k:
            raise ValueError(f"input_signs must have {k} entries, got {tuple(input_signs.shape)}")
        signs = input_signs.detach().reshape(k).to(device=device, dtype=torch.float32).contiguous()
    if smooth is not None:
        if smooth.numel() != k:
            raise ValueError(f"smooth must have {k} entries, got {tuple(smooth.shape)}")
        smooth = smooth.detach().reshape(k).to(device=device, dtype=torch.float32).contiguous()
    return signs, rot_block, smooth


def has_transform(input_signs: Tensor | None, rot_block: int, smooth: Tensor | None) -> bool:
    return rot_block > 0 or input_signs is not None or smooth is not None


def fwht_fp32(v: Tensor, block: int) -> Tensor:
    """Unnormalised Walsh–Hadamard transform over consecutive blocks of the last dim, in v's dtype.

    Radix-2 butterflies in the fixed order h = 1, 2, 4, … (pairs k, k + h): the order that
    defines the rounding every backend reproduces; the training path (qvgen.transforms.fwht) calls it too.
    """
    shape = v.shape
    y = v.reshape(-1, shape[-1] // block, block)
    h = 1
    while h < block:
        y = y.view(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=3)
        h *= 2
    return y.reshape(shape)


def apply_transform(x2d: Tensor, signs: Tensor | None, block: int, smooth: Tensor | None) -> Tensor:
    """The transformed activation `x'` (float32, (M, K)), with the rounding that defines the contract:

    `v = fp32(x) · signs` (exact), radix-2 butterflies in fp32 (h = 1, 2, 4, …), `v / fp32(√block)`
    (IEEE division; exact for block = 4^j), then `v / smooth` (IEEE division). This is exactly
    what the training path (`qvgen.transforms.rotate` then `/ smooth`) computes on fp32 inputs.
    """
    v = x2d.float()
    if signs is not None:
        v = v * signs
        if block > 1:
            v = exact_div(fwht_fp32(v, block), math.sqrt(block))
    if smooth is not None:
        v = v / smooth
    return v
