"""SVDQuant W4A4 (comfy-kitchen's `TensorCoreSVDQuantW4A4Layout`) as a QAT target and a PyTorch path.

The layout computes, for a layer with weight `W` (out × K), smoothing factor `s` (K) and low-rank
factors `proj_down` (K × r), `proj_up` (out × r):

    y = Q_a(x / s) · Q_w(R)ᵀ + (x · proj_down) · proj_upᵀ + b

- `Q_a`: each token's K features split into groups of 64, each group quantized to signed int4
  [-7, 7] with its own absmax scale `max|g| / 7` (computed in the input's dtype, floored at 1e-10);
- `Q_w`: the residual weight `R ≈ W · diag(s) - proj_up · proj_downᵀ · diag(s)` stored as packed
  signed int4 (`(out, K/2)` int8, even column in the low nibble) with one scale per (row, group of
  64), stored transposed as `wscales` `(K/64, out)` in the compute dtype;
- the low-rank branch sees the raw input (not smoothed, not quantized) and runs in float32.

comfy-kitchen has no quantizer for this layout ("requires offline calibration (DeepCompressor)").
A QVGen student with smoothing on and Φ kept at rank r *is* this format: Φ lives in the smoothed
space (`Φ = L·Rφ` with `x/s` as input), so `proj_down = Rφᵀ / s`, `proj_up = L`. The weight scales
are QVGen's choice, not the layout's: per (row, group) absmax / 7, learned with LSQ gradients, and
rounded to the export dtype in the forward pass so that what trains is what is stored.

In this project's training form Φ acts on the *unquantized* (smoothed) input, as the layout's
branch does, instead of on `x̂` as in the paper's Φ.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..quantizers import clamp_ste_edges, round_ste
from .base import Scheme, fixed_arithmetic, pack_via_state_dict
from .convrot import pack_int4, unpack_int4

if TYPE_CHECKING:
    from ..config import QVGenConfig

GROUP = 64  # the layout's quantization group along K (int4 MMA m16n8k64)
INT4_MAX = 7
ABSMAX_MIN = 1e-10
COMFY_FORMAT = "svdquant_w4a4"
# exported in the export dtype (comfy-kitchen computes with them in it); the codes keep theirs
EXPORT_CAST = ("bias", "weight_scale", "weight_proj_down", "weight_proj_up", "weight_smooth_factor")

__all__ = [
    "COMFY_FORMAT",
    "GROUP",
    "SCHEME",
    "SVDQuantLinear",
    "GroupActQuantizer",
    "GroupWeightQuantizer",
    "cast_ste",
    "dequantize_weight",
    "fake_quant_groups",
    "group_absmax_scale",
    "pack_int4",
    "quantize_groups",
    "supports",
    "svdquant_linear",
    "unpack_int4",
]


def supports(in_features: int) -> bool:
    """Whether the layout can hold a layer with this K (groups of 64)."""
    return in_features % GROUP == 0 and in_features > 0


def _groups(x: Tensor) -> Tensor:
    k = x.shape[-1]
    if k % GROUP:
        raise ValueError(f"SVDQuant: {k} features are not a multiple of the group size {GROUP}")
    return x.unflatten(-1, (k // GROUP, GROUP))


def group_absmax_scale(x: Tensor, qmax: int = INT4_MAX) -> Tensor:
    """Per (row, group of 64) scale `max|g| / qmax`, shape `(…, K/64, 1)`, in `x`'s dtype (as the layout)."""
    return _groups(x).abs().amax(dim=-1, keepdim=True).clamp(min=ABSMAX_MIN) / qmax


def fake_quant_groups(x: Tensor, scale: Tensor, qmax: int = INT4_MAX) -> Tensor:
    """`s · clamp(round(x / s), -qmax, qmax)` per group, straight-through rounding; `scale` `(…, K/64, 1)`."""
    q = clamp_ste_edges(round_ste(_groups(x) / scale), -qmax, qmax)
    return (q * scale).flatten(-2)


def quantize_groups(x: Tensor, scale: Tensor, qmax: int = INT4_MAX) -> Tensor:
    """Integer codes (int8, `(…, K)`) of `fake_quant_groups`, round half to even like the layout."""
    return torch.clamp(torch.round(_groups(x) / scale), -qmax, qmax).to(torch.int8).flatten(-2)


def cast_ste(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    """`x` rounded to `dtype` (and back to `x`'s dtype) in the forward pass, identity in the backward pass.

    Written so that the forward value is exactly the rounded one (`v + (x - x) = v`).
    """
    if dtype is None or dtype == x.dtype:
        return x
    return x.to(dtype).to(x.dtype).detach() + (x - x.detach())


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """Value of `x` bit for bit, gradient times `factor` (LSQ's step-size gradient scaling).

    `qvgen.quantizers.grad_scale` computes `(x - f·x) + f·x`, which can be one ulp off `x`; an
    exported scale must be the one the forward pass used.
    """
    return x.detach() + (x * factor - (x * factor).detach())


def dequantize_weight(qweight: Tensor, wscales: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """`q · s` per group, `(out, K)`, in `dtype` (default: `wscales`' dtype), as the layout's eager GEMM."""
    dtype = wscales.dtype if dtype is None else dtype
    q = unpack_int4(qweight).to(dtype)
    n, k = q.shape
    return (q.view(n, k // GROUP, GROUP) * wscales.to(dtype).t().unsqueeze(-1)).view(n, k)


def svdquant_linear(
    x: Tensor,
    qweight: Tensor,
    wscales: Tensor,
    smooth: Tensor,
    proj_down: Tensor,
    proj_up: Tensor,
    bias: Tensor | None = None,
) -> Tensor:
    """One SVDQuant W4A4 layer in plain PyTorch: the layout's arithmetic with dequantized operands.

    Codes, scales and the low-rank branch are computed as comfy-kitchen's eager backend does (same
    dtypes, same order of the element-wise steps); the GEMM is a float matmul of the dequantized
    operands, so the result equals the layout's up to float summation order.
    """
    shape = x.shape
    k = shape[-1]
    if qweight.shape[-1] * 2 != k:
        raise ValueError(f"SVDQuant: input has {k} features but the packed weight holds {qweight.shape[-1] * 2}")
    x2 = x.reshape(-1, k)
    cdtype = wscales.dtype
    lora = (x2.float() @ proj_down.float()) @ proj_up.float().t()
    xs = x2 / smooth
    sx = group_absmax_scale(xs)
    q = torch.clamp(torch.round(_groups(xs) / sx), -INT4_MAX, INT4_MAX)
    x_hat = (q.to(cdtype) * sx.to(x.dtype)).flatten(-2)
    y = x_hat @ dequantize_weight(qweight, wscales).t()
    y = y + lora.to(y.dtype)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*shape[:-1], qweight.shape[0])


# ---- training form -------------------------------------------------------------------------------
class GroupWeightQuantizer(nn.Module):
    """Signed int4 per (row, group of 64) with learnable scales (LSQ gradient scaling).

    `scale_dtype` is the dtype the scales are exported in (`wscales`, bf16 by default): the forward
    pass rounds the scale to it (straight through), so the exported codes and scales are exactly
    the ones training used.
    """

    def __init__(self, out_features: int, in_features: int, scale_dtype: torch.dtype | None = torch.bfloat16) -> None:
        super().__init__()
        if not supports(in_features):
            raise ValueError(f"SVDQuant needs in_features divisible by {GROUP}, got {in_features}")
        self.bits = 4
        self.qmax = INT4_MAX
        self.scale_dtype = scale_dtype
        self.scale = nn.Parameter(torch.ones(out_features, in_features // GROUP, 1))
        self.grad_factor = 1.0 / math.sqrt(GROUP * INT4_MAX)

    @torch.no_grad()
    def init_from(self, weight: Tensor) -> None:
        self.scale.copy_(group_absmax_scale(weight.detach().float()))

    def effective_scale(self) -> Tensor:
        s = scale_grad(self.scale, self.grad_factor).clamp(min=ABSMAX_MIN)
        return cast_ste(s, self.scale_dtype)

    def forward(self, weight: Tensor) -> Tensor:
        return fake_quant_groups(weight.float(), self.effective_scale()).to(weight.dtype)

    @torch.no_grad()
    def export(self, weight: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """Packed codes `(out, K/2)` int8 and `wscales` `(K/64, out)` in `dtype` (default `scale_dtype`).

        The scales are the forward pass's (rounded to `scale_dtype`), so the codes are training's.
        """
        s = cast_ste(self.scale.detach().float().clamp(min=ABSMAX_MIN), self.scale_dtype)
        codes = quantize_groups(weight.detach().float(), s)
        s = s.to(dtype or self.scale_dtype or torch.float32)
        return pack_int4(codes), s.squeeze(-1).t().contiguous()


class GroupActQuantizer(nn.Module):
    """Dynamic signed int4 per (token, group of 64), absmax scales: the layout has no clipping to learn."""

    def __init__(self) -> None:
        super().__init__()
        self.bits = 4
        self.qmax = INT4_MAX

    def forward(self, x: Tensor, bucket: Tensor | int = 0) -> Tensor:  # bucket: same call as ActQuantizer
        return fake_quant_groups(x, group_absmax_scale(x))


# ---- inference form ------------------------------------------------------------------------------
class SVDQuantLinear(nn.Module):
    """Inference form of a ComfyUI `svdquant_w4a4` layer, with ComfyUI's tensor names.

    Runs `svdquant_linear` in the input's dtype (stored bf16 tensors are upcast exactly); ComfyUI
    runs the same file with comfy-kitchen's kernels.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        rank: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not supports(in_features):
            raise ValueError(f"SVDQuant needs in_features divisible by {GROUP}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features

        def p(t: Tensor) -> nn.Parameter:
            return nn.Parameter(t, requires_grad=False)

        # `weight_scale` first: `next(module.parameters()).dtype` must be a float dtype
        self.weight_scale = p(torch.ones(in_features // GROUP, out_features, dtype=dtype, device=device))
        self.weight = p(torch.zeros(out_features, in_features // 2, dtype=torch.int8, device=device))
        self.weight_proj_down = p(torch.zeros(in_features, rank, dtype=dtype, device=device))
        self.weight_proj_up = p(torch.zeros(out_features, rank, dtype=dtype, device=device))
        self.weight_smooth_factor = p(torch.ones(in_features, dtype=dtype, device=device))
        self.bias = p(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @property
    def rank(self) -> int:
        return self.weight_proj_down.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        d = x.dtype
        return svdquant_linear(
            x,
            self.weight,
            self.weight_scale.to(d),
            self.weight_smooth_factor.to(d),
            self.weight_proj_down,
            self.weight_proj_up,
            None if self.bias is None else self.bias.to(d),
        )

    @torch.no_grad()
    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """`Q(R) / s + proj_up · proj_downᵀ`: the weight the layer applies to a token it did not quantize."""
        w = dequantize_weight(self.weight, self.weight_scale.float()) / self.weight_smooth_factor.float()
        return (w + self.weight_proj_up.float() @ self.weight_proj_down.float().t()).to(dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, W4A4 g{GROUP}, rank={self.rank}, svdquant_w4a4"


# ---- the scheme ----------------------------------------------------------------------------------
def check(config: QVGenConfig) -> str | None:
    """SVDQuant fixes W4, per-group A4 and smoothing (its `smooth_factor`); no rotation in the format."""
    return fixed_arithmetic(
        config,
        COMFY_FORMAT,
        weight_bits="int4 weights",
        act_bits={4: "int4"},
        input_transform="smooth",
        transform_note="stores a smoothing factor and no rotation",
        low_rank_branch=True,
    )


def unsupported(in_features: int) -> str | None:
    return None if supports(in_features) else f"SVDQuant needs in_features divisible by {GROUP}, got {in_features}"


def quantizers(out_features: int, in_features: int, config: QVGenConfig) -> tuple[nn.Module, nn.Module]:
    return GroupWeightQuantizer(out_features, in_features), GroupActQuantizer()


@torch.no_grad()
def export(layer: Any) -> dict[str, Tensor]:
    """ComfyUI's `svdquant_w4a4` tensors of a trained `QVGenLinear` (float32 but for the codes).

    Φ (in the smoothed space, input `x / s`) becomes the branch on the raw input:
    `proj_down = Rφᵀ / s`, `proj_up = L · mask`; at rank 0 both have 0 columns.
    """
    s = layer.smooth_scale()
    if s is None:
        raise ValueError("an svdquant_w4a4 layer needs its smoothing factor (input_transform 'smooth')")
    s = s.detach().float()
    qweight, wscales = layer.weight_quantizer.export(layer.effective_weight())
    r = layer.rank
    k, n = layer.in_features, layer.out_features
    down = (layer.phi_down[:r].float() / s).t() if r else torch.zeros(k, 0)
    up = layer.phi_up[:, :r].float() * layer.phi_mask[:r] if r else torch.zeros(n, 0)
    out = {
        "weight": qweight,
        "weight_scale": wscales.float(),
        "weight_proj_down": down.contiguous(),
        "weight_proj_up": up.contiguous(),
        "weight_smooth_factor": s.clone(),
    }
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().float().clone()
    return out


def shell(
    linear: nn.Module, config: QVGenConfig, rank: int, dtype: torch.dtype, device: torch.device | str
) -> SVDQuantLinear:
    return SVDQuantLinear(linear.in_features, linear.out_features, linear.bias is not None, rank, dtype, device)


def layer_conf(layer: nn.Module, config: QVGenConfig) -> dict:
    return {"format": COMFY_FORMAT}


def from_comfy(name: str, conf: dict, tensors: dict[str, Tensor], linear: nn.Module, dtype: torch.dtype) -> nn.Module:
    """An `SVDQuantLinear` holding a ComfyUI file's layer, after checking every tensor's shape."""
    if conf.get("act_unsigned"):
        raise ValueError(f"layer '{name}': act_unsigned (nunchaku's post-GELU layers) is not supported")
    k, n = linear.in_features, linear.out_features
    down = tensors.get("weight_proj_down")
    r = down.shape[-1] if down is not None and down.dim() == 2 else -1
    want = {
        "weight": (n, k // 2),
        "weight_scale": (k // GROUP, n),
        "weight_proj_down": (k, r),
        "weight_proj_up": (n, r),
        "weight_smooth_factor": (k,),
    }
    if linear.bias is not None:
        want["bias"] = (n,)
    for key, shape in want.items():
        t = tensors.get(key)
        if t is None or tuple(t.shape) != shape or r < 0:
            got = "nothing (missing)" if t is None else f"{t.dtype} of shape {tuple(t.shape)}"
            raise ValueError(f"tensor '{name}.{key}': expected shape {shape} for a {k}→{n} layer, got {got}")
    if tensors["weight"].dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"tensor '{name}.weight': expected int8 (packed int4), got {tensors['weight'].dtype}")
    return SVDQuantLinear(k, n, linear.bias is not None, r, dtype)


SCHEME = Scheme(
    name=COMFY_FORMAT,
    file_format="comfy",
    check=check,
    unsupported=unsupported,
    quantizers=quantizers,
    rotate=None,
    export=export,
    shell=shell,
    pack=pack_via_state_dict(shell, export, keeps_rank=True),
    inference_types=(SVDQuantLinear,),
    phi_sees_input=True,
)
