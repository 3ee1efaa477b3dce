"""Weight and activation quantizers of QVGen (DESIGN.md part A), in fake-quant training form.

Both are asymmetric with straight-through rounding. The weight quantizer learns a per-row scale
and a *real* zero point (LSQ+); the activation quantizer is dynamic per token (or per group of
`group` consecutive input features of a token, `QVGenConfig.act_group_size`) and learns only its
clipping factors, one pair per timestep bucket, shared by the groups of a token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .kernels_import import qvgen_kernels

exact_div = qvgen_kernels.common.exact_div

SCALE_MIN = 1e-5
# How the activation zero point's rounding passes gradient to the clipping logits (and the scale):
# "ste" straight through (the clipped outliers follow the clip bound), "none" no gradient (the
# authors' code). See docs/training.md, "The clipping logits' gradient".
ZERO_POINT_GRADS = ("ste", "none")
CLIP_RATIOS = tuple(round(1.0 - 0.01 * i, 2) for i in range(80))  # 1.00, 0.99, ..., 0.21
CLIP_SEARCH_NORM = 2.4


def round_ste(x: Tensor) -> Tensor:
    """`round` in the forward pass, identity in the backward pass."""
    return (x.round() - x).detach() + x


def clamp_ste_edges(x: Tensor, lo: Tensor | float | None = None, hi: Tensor | float | None = None) -> Tensor:
    """`torch.clamp(x, lo, hi)` whose gradient passes where `lo <= x <= hi`, edges included.

    torch 2.14 stopped passing clamp's gradient at the edges (2.13 and older pass it). Quantizers
    land on the edges all the time (a code rounded to exactly `qmax`, a clip factor starting at its
    bound), so the plain clamp would train differently with the torch version.
    """
    clamped = torch.clamp(x.detach(), lo, hi)
    inside = clamped == x.detach()
    return torch.where(inside, x, clamped)


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Value of `x`, gradient multiplied by `scale` (LSQ's step-size gradient scaling)."""
    return (x - x * scale).detach() + x * scale


def fake_quant_weight(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """`s · (clamp(round(W/s + z), 0, 2^b-1) - z)` with STE round; `s`, `z` shaped (out, 1)."""
    qmax = 2**bits - 1
    q = clamp_ste_edges(round_ste(w / scale + zero), 0, qmax)
    return scale * (q - zero)


def quantize_weight_int(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Integer codes of the weight (uint8), the same values `fake_quant_weight` uses."""
    qmax = 2**bits - 1
    return torch.clamp(torch.round(w.float() / scale.float() + zero.float()), 0, qmax).to(torch.uint8)


def init_weight_qparams(w: Tensor, bits: int, norm: float = CLIP_SEARCH_NORM) -> tuple[Tensor, Tensor]:
    """Clip-ratio search per row: keep the ratio minimising Σ|Q(W) - W|^2.4 (returns `s`, `z`).

    All ratios are tried at once on blocks of rows (≤ 2^24 elements per block), so large layers
    stay within memory and small ones are not dominated by per-call overhead.
    """
    return _search(w, bits, norm, CLIP_RATIOS)


def minmax_weight_qparams(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Plain per-row min/max `s`, `z` (round-to-nearest without clipping): the clip search's ratio 1.00."""
    return _search(w, bits, CLIP_SEARCH_NORM, (1.0,))


def _search(w: Tensor, bits: int, norm: float, ratios: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    w = w.detach().float()
    rows = max(1, (1 << 24) // (w.shape[1] * len(ratios)))
    parts = [_search_rows(w[i : i + rows], bits, norm, ratios) for i in range(0, w.shape[0], rows)]
    scales, zeros = zip(*parts, strict=True)
    return torch.cat(scales), torch.cat(zeros)


def _search_rows(w: Tensor, bits: int, norm: float, ratio_list: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    qmax = 2**bits - 1
    ratios = torch.tensor(ratio_list, device=w.device).view(-1, 1, 1)
    lo = w.amin(dim=1, keepdim=True) * ratios  # (R, rows, 1)
    hi = w.amax(dim=1, keepdim=True) * ratios
    s = exact_div(hi - lo, qmax).clamp(min=SCALE_MIN)
    z = -lo / s
    if len(ratio_list) == 1:
        return s[0], z[0]
    err = (fake_quant_weight(w, s, z, bits) - w).abs().pow(norm).sum(dim=2)  # (R, rows)
    best = err.argmin(dim=0)  # first (largest) ratio on ties, as a sequential search would keep
    idx = torch.arange(w.shape[0], device=w.device)
    return s[best, idx], z[best, idx]


class WeightQuantizer(nn.Module):
    """Per-output-channel asymmetric quantizer with learnable scale and real zero point (LSQ+)."""

    def __init__(self, out_features: int, in_features: int, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.scale = nn.Parameter(torch.ones(out_features, 1))
        self.zero = nn.Parameter(torch.zeros(out_features, 1))
        self.grad_factor = 1.0 / math.sqrt(in_features * (2**bits - 1))

    @torch.no_grad()
    def init_from(self, weight: Tensor) -> None:
        s, z = init_weight_qparams(weight, self.bits)
        self.scale.copy_(s)
        self.zero.copy_(z)

    def forward(self, weight: Tensor) -> Tensor:
        s = grad_scale(self.scale, self.grad_factor).clamp(min=SCALE_MIN)
        z = grad_scale(self.zero, self.grad_factor)
        return fake_quant_weight(weight.float(), s, z, self.bits).to(weight.dtype)

    def int_codes(self, weight: Tensor) -> Tensor:
        return quantize_weight_int(weight, self.scale.clamp(min=SCALE_MIN), self.zero, self.bits)


def act_qparams(
    x: Tensor, clip_lo: Tensor | float, clip_hi: Tensor | float, bits: int, zero_point_grad: str = "ste"
) -> tuple[Tensor, Tensor]:
    """Per-token scale and integer zero point from the clipped row min/max (fp32).

    `zero_point_grad` picks the gradient of `round(-min / s)`: "ste" (identity) or "none" (zero).
    """
    qmax = 2**bits - 1
    xmin = x.amin(dim=-1, keepdim=True) * clip_lo
    xmax = x.amax(dim=-1, keepdim=True) * clip_hi
    s = exact_div(xmax - xmin, qmax).clamp(min=SCALE_MIN)
    if zero_point_grad == "ste":
        z = clamp_ste_edges(round_ste(-xmin / s), 0, qmax)
    elif zero_point_grad == "none":
        z = torch.clamp(torch.round(-xmin.detach() / s.detach()), 0, qmax)
    else:
        raise ValueError(f"zero_point_grad: expected one of {list(ZERO_POINT_GRADS)}, got {zero_point_grad!r}")
    return s, z


def act_group_length(in_features: int, group_size: int | None) -> int:
    """Features per activation group of a layer: `group_size` when it divides K, else 0 (per token).

    A layer whose K is not a multiple (or not larger) keeps per-token quantization, as a Hadamard
    block too large for a layer shrinks (`transforms.hadamard_block`): the config stays one setting.
    """
    if group_size is None or group_size >= in_features or in_features % group_size:
        return 0
    return group_size


def _by_group(
    x: Tensor, clip_lo: Tensor | float, clip_hi: Tensor | float, group: int
) -> tuple[Tensor, Tensor | float, Tensor | float]:
    """`x` (…, K) as (…, K/group, group), the per-token clip factors broadcast over its groups."""

    def widen(c: Tensor | float) -> Tensor | float:
        return c.unsqueeze(-1) if isinstance(c, Tensor) and c.dim() > 0 else c

    return x.unflatten(-1, (-1, group)), widen(clip_lo), widen(clip_hi)


def fake_quant_act(
    x: Tensor,
    clip_lo: Tensor | float,
    clip_hi: Tensor | float,
    bits: int,
    zero_point_grad: str = "ste",
    group: int = 0,
) -> Tensor:
    """Dynamic asymmetric fake quantization per token (`group=0`) or per `group` features, STE round, fp32."""
    if group:
        xg, lo, hi = _by_group(x, clip_lo, clip_hi, group)
        return fake_quant_act(xg, lo, hi, bits, zero_point_grad).flatten(-2)
    qmax = 2**bits - 1
    xf = x.float()
    s, z = act_qparams(xf, clip_lo, clip_hi, bits, zero_point_grad)
    q = clamp_ste_edges(round_ste(xf / s) + z, 0, qmax)
    return (s * (q - z)).to(x.dtype)


def quantize_act_int(x: Tensor, clip_lo: Tensor | float, clip_hi: Tensor | float, bits: int, group: int = 0) -> Tensor:
    """Integer codes (uint8) of `fake_quant_act`, the values the kernels' activation quantization produces."""
    if group:
        xg, lo, hi = _by_group(x, clip_lo, clip_hi, group)
        return quantize_act_int(xg, lo, hi, bits).flatten(-2)
    qmax = 2**bits - 1
    xf = x.float()
    s, z = act_qparams(xf, clip_lo, clip_hi, bits)
    return torch.clamp(torch.round(xf / s) + z, 0, qmax).to(torch.uint8)


class ActQuantizer(nn.Module):
    """Per-token (or per-group, `group` > 0) dynamic quantizer; one learnable pair of clipping logits
    per timestep bucket."""

    def __init__(
        self,
        bits: int,
        n_buckets: int,
        fixed_clip: float = 0.95,
        logit_init: float = 2.944,
        zero_point_grad: str = "ste",
        group: int = 0,
    ) -> None:
        super().__init__()
        if zero_point_grad not in ZERO_POINT_GRADS:
            raise ValueError(f"zero_point_grad: expected one of {list(ZERO_POINT_GRADS)}, got {zero_point_grad!r}")
        self.bits = bits
        self.fixed_clip = fixed_clip
        self.zero_point_grad = zero_point_grad
        self.group = group
        self.clip_logits = nn.Parameter(torch.full((n_buckets, 2), float(logit_init)))

    def clip_factors(self) -> Tensor:
        """Effective (lower, upper) factors per bucket, `fixed · sigmoid(γ)`, shape (n_buckets, 2)."""
        return self.fixed_clip * torch.sigmoid(self.clip_logits)

    def factors_for(self, bucket: Tensor | int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Clip factors broadcastable against `x`'s per-token (…, 1) statistics."""
        return select_clip(self.clip_factors(), bucket, x)

    def forward(self, x: Tensor, bucket: Tensor | int = 0) -> Tensor:
        lo, hi = self.factors_for(bucket, x)
        return fake_quant_act(x, lo, hi, self.bits, self.zero_point_grad, self.group)

    @torch.no_grad()
    def int_codes(self, x: Tensor, bucket: Tensor | int = 0) -> Tensor:
        """The integer codes `forward` uses (uint8, x's shape)."""
        lo, hi = self.factors_for(bucket, x)
        return quantize_act_int(x, lo, hi, self.bits, self.group)


def select_clip(factors: Tensor, bucket: Tensor | int, x: Tensor) -> tuple[Tensor, Tensor]:
    """Pick (lower, upper) factors for `x` from a (n_buckets, 2) table.

    `bucket` is an int or a one-element tensor (whole batch) or a (B,) tensor, one bucket per sample
    along x's first dim.
    """
    if isinstance(bucket, Tensor) and bucket.numel() > 1:
        if bucket.numel() != x.shape[0]:
            raise ValueError(f"timestep bucket has {bucket.numel()} entries but the input batch is {x.shape[0]}")
        f = factors[bucket.to(factors.device).long()]  # (B, 2)
        f = f.view(f.shape[0], *([1] * (x.dim() - 2)), 2)
    elif isinstance(bucket, Tensor):  # one bucket for the batch, indexed on the device (no .item())
        f = factors.index_select(0, bucket.reshape(1).to(factors.device, torch.long))[0]
    else:
        f = factors[int(bucket)]
    return f[..., 0:1].float(), f[..., 1:2].float()
