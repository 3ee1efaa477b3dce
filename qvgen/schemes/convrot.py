"""The `convrot_w4a4` scheme: ComfyUI's native ConvRot W4A4 as a QAT target, and its inference layer.

ConvRot (comfy-kitchen's `convrot_w4a4` layout, run by ComfyUI's stock loader) computes a linear
layer as follows; this module reproduces it so QAT trains for exactly what ComfyUI will run:

- rotation: the input features are split into groups of 256 and each group is multiplied by the
  regular Hadamard matrix `H = H4^{⊗4} / 16` (`H4` the 4×4 regular Hadamard). `H` is symmetric
  and orthogonal, so `x Wᵀ = (x H)(W H)ᵀ`: the weight is stored rotated, the input is rotated
  at run time;
- weight: signed symmetric int4 in [-7, 7] with one scale per output row
  (`q = clamp(round(W H / s), -7, 7)`), two codes per byte (even column in the low nibble),
  stored as int8 `(out, K/2)`; the scale is float32 `(out,)`;
- activations: each token (row) of `x H` is quantized the same way with its own absmax scale,
  `s_x = max|x H| / 7` (int4 tensor cores and comfy-kitchen's eager backend); GPUs without int4
  MMA (Hopper) or layers flagged `linear_dtype: "int8"` quantize tokens to int8 (`/ 127`) instead;
- `y = s_x s_w (Σ q_x q_w) + bias`.

K must be a multiple of 256 (the rotation group) and of 64 (the kernel's quantization group).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..kernels_import import qvgen_kernels
from ..quantizers import clamp_ste_edges, grad_scale, round_ste
from .base import Scheme, fixed_arithmetic, pack_via_state_dict

if TYPE_CHECKING:
    from ..config import QVGenConfig

# the arithmetic lives with the kernels (kernels/convrot.py); these names are its training-side view
COMFY_FORMAT = "convrot_w4a4"  # the layout name ComfyUI reads in `comfy_quant`
CONVROT_GROUP = qvgen_kernels.convrot.CONVROT_GROUP
QUANT_GROUP = qvgen_kernels.convrot.QUANT_GROUP
INT4_MAX = qvgen_kernels.convrot.INT4_MAX
ABSMAX_MIN = qvgen_kernels.convrot.ABSMAX_MIN
signed_max = qvgen_kernels.convrot.signed_max
supports = qvgen_kernels.convrot.supports
regular_hadamard = qvgen_kernels.convrot.regular_hadamard
rotate = qvgen_kernels.convrot.rotate
absmax_scale = qvgen_kernels.convrot.absmax_scale
quantize_codes = qvgen_kernels.convrot.quantize_codes
pack_int4 = qvgen_kernels.convrot.pack_int4
unpack_int4 = qvgen_kernels.convrot.unpack_int4
quantize_acts = qvgen_kernels.convrot.quantize_acts
convrot_linear = qvgen_kernels.convrot.convrot_linear
int_matmul = qvgen_kernels.convrot.int_matmul


def fake_quant_symmetric(x: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """`s · clamp(round(x / s), -qmax, qmax)` with straight-through rounding."""
    return scale * clamp_ste_edges(round_ste(x / scale), -qmax, qmax)


# ---- training form -------------------------------------------------------------------------------
class SymmetricWeightQuantizer(nn.Module):
    """Per-output-row signed symmetric quantizer with a learnable scale (LSQ gradient scaling).

    The scale is what gets exported as ComfyUI's `weight_scale`, so a learned one is deployed
    exactly; it starts at the absmax scale ComfyUI's own quantizer would pick.
    """

    def __init__(self, out_features: int, in_features: int, bits: int = 4) -> None:
        super().__init__()
        self.bits = bits
        self.qmax = signed_max(bits)
        self.scale = nn.Parameter(torch.ones(out_features, 1))
        self.grad_factor = 1.0 / math.sqrt(in_features * self.qmax)

    @torch.no_grad()
    def init_from(self, weight: Tensor) -> None:
        self.scale.copy_(absmax_scale(weight.detach().float(), self.qmax))

    def forward(self, weight: Tensor) -> Tensor:
        s = grad_scale(self.scale, self.grad_factor).clamp(min=ABSMAX_MIN)
        return fake_quant_symmetric(weight.float(), s, self.qmax).to(weight.dtype)

    def export_scale(self) -> Tensor:
        return self.scale.detach().float().clamp(min=ABSMAX_MIN).reshape(-1).clone()

    def int_codes(self, weight: Tensor) -> Tensor:
        return quantize_codes(weight, self.scale.detach().clamp(min=ABSMAX_MIN), self.qmax)


class AbsmaxActQuantizer(nn.Module):
    """Dynamic per-token signed symmetric quantizer (no parameters: ComfyUI has no clipping)."""

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        self.bits = bits
        self.qmax = signed_max(bits)

    def forward(self, x: Tensor, bucket: Tensor | int = 0) -> Tensor:  # bucket: same call as ActQuantizer
        xf = x.float()
        return fake_quant_symmetric(xf, absmax_scale(xf, self.qmax), self.qmax).to(x.dtype)


def comfy_layer_conf(act_bits: int, group: int = CONVROT_GROUP) -> dict:
    """The per-layer entry ComfyUI reads (`comfy_quant` / `_quantization_metadata`).

    `linear_dtype: "int8"` makes ComfyUI quantize tokens to int8 on every GPU; without it it
    uses int4 tokens where the GPU has int4 MMA (and int8 elsewhere).
    """
    conf: dict = {"format": COMFY_FORMAT, "convrot_groupsize": group}
    if act_bits == 8:
        conf["linear_dtype"] = "int8"
    return conf


# ---- inference form -----------------------------------------------------------------------------
class ConvRotLinear(nn.Module):
    """Inference form of a ComfyUI `convrot_w4a4` layer (same tensor names as ComfyUI's checkpoint).

    Runs `convrot_linear` in PyTorch; ComfyUI itself runs the same file with
    comfy-kitchen's kernels.
    """

    keep_dtype = ("weight_scale",)  # stored float32 whatever the compute dtype

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        act_bits: int = 4,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not supports(in_features):
            raise ValueError(f"ConvRot needs in_features divisible by {CONVROT_GROUP}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.act_bits = act_bits
        self.group = CONVROT_GROUP
        # `weight_scale` first: `next(module.parameters()).dtype` must be a float dtype (see PackedLinear).
        self.weight_scale = nn.Parameter(torch.ones(out_features, device=device), requires_grad=False)
        w = torch.zeros(out_features, in_features // 2, dtype=torch.int8, device=device)
        self.weight = nn.Parameter(w, requires_grad=False)
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self.bias = None if b is None else nn.Parameter(b, requires_grad=False)

    @property
    def rank(self) -> int:
        return 0

    def forward(self, x: Tensor) -> Tensor:
        return convrot_linear(x, self.weight, self.weight_scale, self.bias, act_bits=self.act_bits, group=self.group)

    @torch.no_grad()
    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """`s_w q_w` rotated back to the original input space (for LoRA patching and debugging)."""
        w = unpack_int4(self.weight).float() * self.weight_scale.float()[:, None]
        return rotate(w, self.group).to(dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, W4A{self.act_bits}, convrot_w4a4"


# ---- the scheme ----------------------------------------------------------------------------------
def check(config: QVGenConfig) -> str | None:
    """ConvRot fixes the arithmetic: W4, per-token A4 (or A8, ComfyUI's int8 path), its own rotation."""
    return fixed_arithmetic(
        config,
        COMFY_FORMAT,
        weight_bits="int4 weights",
        act_bits={4: "int4", 8: "int8"},
        input_transform="none",
        transform_note="applies its own Hadamard rotation",
    )


def unsupported(in_features: int) -> str | None:
    if supports(in_features):
        return None
    return f"ConvRot needs in_features divisible by {CONVROT_GROUP}: {in_features} is not a multiple of {CONVROT_GROUP}"


def quantizers(out_features: int, in_features: int, config: QVGenConfig) -> tuple[nn.Module, nn.Module]:
    return SymmetricWeightQuantizer(out_features, in_features, config.weight_bits), AbsmaxActQuantizer(config.act_bits)


@torch.no_grad()
def export(layer: Any) -> dict[str, Tensor]:
    """ComfyUI's `convrot_w4a4` tensors: packed int4 `weight` (int8, out × K/2), `weight_scale`, `bias`.

    Φ cannot be expressed in that format, so it must have decayed to rank 0.
    """
    if layer.rank > 0:
        raise ValueError(
            f"layer has Φ rank {layer.rank}; ComfyUI's convrot_w4a4 format has no low-rank branch "
            "(train until the rank decay reaches 0)"
        )
    wq = layer.weight_quantizer
    out = {"weight_scale": wq.export_scale(), "weight": pack_int4(wq.int_codes(layer.weight))}
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().float().clone()
    return out


def shell(
    linear: nn.Module, config: QVGenConfig, rank: int, dtype: torch.dtype, device: torch.device | str
) -> ConvRotLinear:
    if rank:
        raise ValueError("ConvRot layers have no Φ: the rank must have decayed to 0")
    bias = linear.bias is not None
    return ConvRotLinear(linear.in_features, linear.out_features, bias, config.act_bits, dtype, device)


SCHEME = Scheme(
    name=COMFY_FORMAT,
    file_format="comfy",
    check=check,
    unsupported=unsupported,
    quantizers=quantizers,
    rotate=rotate,
    export=export,
    shell=shell,
    pack=pack_via_state_dict(shell, export),
    inference_types=(ConvRotLinear,),
)
