"""The PyTorch reference ("torch" backend): plain, exact arithmetic that the fast paths are tested against.

Quantization parameters use exactly the float32 operations of the training quantizer
(`qvgen.quantizers.act_qparams` / `fake_quant_act`), so the integer codes agree bit for bit.
The layer itself is evaluated as `x̂ Ŵᵀ + b` in float64 with `x̂ = s_x (q_x - z_x)` and
`Ŵ = s_w (q_w - z_w)` — no zero-point algebra, nothing clever — then cast to the output dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import (
    SCALE_MIN,
    ClipArg,
    apply_transform,
    check_act_bits,
    check_act_group,
    check_linear_args,
    check_transform,
    exact_div,
    has_transform,
    row_factors,
)
from .packing import unpack_weight


def act_qparams(x2d: Tensor, lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-row scale and integer zero point (float32, shape (M, 1)); `lo`, `hi` are (M,) float32."""
    qmax = 2**bits - 1
    xf = x2d.float()
    xmin = xf.amin(dim=-1, keepdim=True) * lo[:, None]
    xmax = xf.amax(dim=-1, keepdim=True) * hi[:, None]
    s = exact_div(xmax - xmin, qmax).clamp(min=SCALE_MIN)
    z = torch.clamp(torch.round(-xmin / s), 0, qmax)
    return s, z


def quantize_activation(
    x: Tensor,
    clip_lo: ClipArg,
    clip_hi: ClipArg,
    bits: int,
    *,
    input_signs: Tensor | None = None,
    rot_block: int = 0,
    smooth: Tensor | None = None,
    act_group: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Codes `q` (uint8, x's shape), scale and zero (float32), sums of `q` (int32), per token or group.

    With a transform, the quantized activation is `x' = fwht(x · signs, rot_block) / smooth`
    computed in fp32 by `common.apply_transform` (the rounding every backend reproduces).
    `act_group` g > 0: one scale and zero point per g consecutive features of a token (the token's
    clip factors apply to each group's min/max); the statistics are then `x.shape[:-1] + (K/g,)`.
    """
    qmax = check_act_bits(bits)
    lead, k = x.shape[:-1], x.shape[-1]
    if k == 0:
        raise ValueError("cannot quantize rows of length 0")
    g = check_act_group(k, act_group)
    x2d = x.reshape(-1, k)
    if has_transform(input_signs, rot_block, smooth):
        x2d = apply_transform(x2d, *check_transform(k, input_signs, rot_block, smooth, x.device))
    n_groups = k // g
    lo = row_factors(clip_lo, lead, x.device).repeat_interleave(n_groups)
    hi = row_factors(clip_hi, lead, x.device).repeat_interleave(n_groups)
    xg = x2d.reshape(-1, g)  # one row per (token, group)
    s, z = act_qparams(xg, lo, hi, bits)
    q = torch.clamp(torch.round(xg.float() / s) + z, 0, qmax)
    qsum = q.to(torch.int64).sum(dim=-1, keepdim=True).to(torch.int32)
    stat_shape = (*lead, n_groups)
    return q.to(torch.uint8).reshape(x.shape), s.reshape(stat_shape), z.reshape(stat_shape), qsum.reshape(stat_shape)


def integer_dot(q_x: Tensor, z_x: Tensor, q_w: Tensor, c_w: int = 0) -> Tensor:
    """`Σ_k (q_x - z_x)(q_w - c_w)` exactly (int64), for q_x (M, K), z_x (M, 1), q_w (N, K)."""
    a = q_x.to(torch.int64) - z_x.to(torch.int64)
    b = q_w.to(torch.int64) - c_w
    # int64 matmul is not implemented everywhere; float64 is exact for these magnitudes (< 2^53).
    return (a.double() @ b.double().T).round().to(torch.int64)


def quantized_linear(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    w_zero: Tensor,
    w_qsum: Tensor,
    bias: Tensor | None = None,
    *,
    in_features: int,
    w_bits: int,
    a_bits: int | None,
    clip_lo: ClipArg = 1.0,
    clip_hi: ClipArg = 1.0,
    phi_down: Tensor | None = None,
    phi_up: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    input_signs: Tensor | None = None,
    rot_block: int = 0,
    smooth: Tensor | None = None,
    act_group: int = 0,
) -> Tensor:
    """`x̂ Ŵᵀ + b (+ (x̂ Rᵀ) Lᵀ)` in float64, x̂ quantized from the transformed input `x'`
    (per token, or per `act_group` features).

    `w_qsum` is checked for shape only, never used. Weight-only (`a_bits=None`): x̂ = x'.
    """
    check_linear_args(x, qweight, w_scale, w_zero, w_qsum, bias, in_features, w_bits, a_bits, phi_down, phi_up)
    tf = check_transform(in_features, input_signs, rot_block, smooth, x.device)
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    n = qweight.shape[0]
    q_w = unpack_weight(qweight, w_bits, in_features).double()
    w_hat = w_scale.double().reshape(n, 1) * (q_w - w_zero.double().reshape(n, 1))
    if a_bits is None:
        x2d = x.reshape(-1, in_features)
        x_hat = (apply_transform(x2d, *tf) if has_transform(*tf) else x2d).double()
    else:
        t_kw = dict(input_signs=input_signs, rot_block=rot_block, smooth=smooth, act_group=act_group)
        q, s, z, _ = quantize_activation(x, clip_lo, clip_hi, a_bits, **t_kw)
        g = check_act_group(in_features, act_group)
        q_g = q.reshape(-1, g).double()  # one row per (token, group)
        x_hat = (s.reshape(-1, 1).double() * (q_g - z.reshape(-1, 1).double())).reshape(-1, in_features)
    y = x_hat @ w_hat.T
    if bias is not None:
        y = y + bias.double().reshape(1, n)
    if phi_down is not None:
        y = y + (x_hat @ phi_down.double().T) @ phi_up.double().T
    return y.to(out_dtype).reshape(*lead, n)
