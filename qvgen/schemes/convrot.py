"""ComfyUI's native ConvRot W4A4 arithmetic, as a QAT target and as a PyTorch inference path.

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

from ..quantizers import grad_scale, round_ste
from .base import Scheme

if TYPE_CHECKING:
    from ..config import QVGenConfig

CONVROT_GROUP = 256
QUANT_GROUP = 64  # comfy-kitchen's int4 MMA group; ConvRot's scales are still one per row
INT4_MAX = 7
ABSMAX_MIN = 1e-10
COMFY_FORMAT = "convrot_w4a4"

_H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))
_cache: dict[tuple[int, str, torch.dtype], Tensor] = {}


def signed_max(bits: int) -> int:
    """Largest code of a signed symmetric `bits`-bit quantizer (7 for int4, 127 for int8)."""
    return 2 ** (bits - 1) - 1


def supports(in_features: int, group: int = CONVROT_GROUP) -> bool:
    """Whether ComfyUI can run a layer with this K as `convrot_w4a4` (otherwise it stays bf16)."""
    return in_features % group == 0 and in_features % QUANT_GROUP == 0


def regular_hadamard(size: int = CONVROT_GROUP, device: torch.device | str = "cpu", dtype=torch.float32) -> Tensor:
    """`H4^{⊗k} / √size`: symmetric, orthogonal, every entry ±1/√size (size a power of 4)."""
    k = round(math.log(size, 4)) if size >= 4 else 0
    if size < 4 or 4**k != size:
        raise ValueError(f"regular Hadamard size must be a power of 4, got {size}")
    key = (size, str(device), dtype)
    h = _cache.get(key)
    if h is None:
        h4 = torch.tensor(_H4, dtype=torch.float64)
        h = h4
        for _ in range(k - 1):
            h = torch.kron(h, h4)
        h = (h / math.sqrt(size)).to(device=device, dtype=dtype)
        _cache[key] = h
    return h


def rotate(x: Tensor, group: int = CONVROT_GROUP) -> Tensor:
    """`x` times `blockdiag(H, …, H)` along the last dim; applies to inputs and weight rows alike.

    A dense per-group matmul, the way comfy-kitchen's eager backend does it, so the rotated
    values (and hence every rounding decision) match the reference in float32.
    """
    k = x.shape[-1]
    if k % group:
        raise ValueError(f"ConvRot: {k} features are not a multiple of the rotation group {group}")
    h = regular_hadamard(group, x.device, x.dtype)
    return (x.reshape(-1, k // group, group) @ h).reshape(x.shape)


def absmax_scale(x: Tensor, qmax: int) -> Tensor:
    """Per-row symmetric scale `max|x| / qmax` (kept ≥ 1e-10 / qmax, as comfy-kitchen does)."""
    return x.abs().amax(dim=-1, keepdim=True).clamp(min=ABSMAX_MIN) / qmax


def fake_quant_symmetric(x: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """`s · clamp(round(x / s), -qmax, qmax)` with straight-through rounding."""
    return scale * torch.clamp(round_ste(x / scale), -qmax, qmax)


def quantize_codes(x: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """Integer codes (int8) of `fake_quant_symmetric`, round half to even like torch.round."""
    return torch.clamp(torch.round(x.float() / scale.float()), -qmax, qmax).to(torch.int8)


def pack_int4(q: Tensor) -> Tensor:
    """Signed int4 codes `(…, K)` → int8 `(…, K/2)`, even column in the low nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    lo = q[..., 0::2].to(torch.int32) & 0xF
    hi = q[..., 1::2].to(torch.int32) & 0xF
    return (lo | (hi << 4)).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4`: int8 `(…, K/2)` → signed codes int8 `(…, K)` in [-8, 7]."""
    b = packed.view(torch.uint8).to(torch.int32)
    lo, hi = b & 0xF, (b >> 4) & 0xF
    both = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], -1)
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def quantize_acts(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-token signed symmetric codes (int8 storage) and float32 scales `(M, 1)` of a rotated input."""
    qmax = signed_max(bits)
    s = absmax_scale(x.float(), qmax)
    return quantize_codes(x, s, qmax), s


def convrot_linear(
    x: Tensor,
    qweight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    *,
    act_bits: int = 4,
    group: int = CONVROT_GROUP,
) -> Tensor:
    """A ConvRot W4A4 layer in plain PyTorch (CPU or GPU): rotate, quantize tokens, integer GEMM.

    The integer products are summed exactly (int32 via `torch._int_mm` when available, else
    float64), then scaled in float32: the same result comfy-kitchen's kernels compute, up to
    their float rounding of the scales.
    """
    shape = x.shape
    k = shape[-1]
    if qweight.shape[-1] * 2 != k:
        raise ValueError(f"ConvRot: input has {k} features but the packed weight holds {qweight.shape[-1] * 2}")
    x2 = rotate(x.reshape(-1, k).float(), group)
    qx, sx = quantize_acts(x2, act_bits)
    qw = unpack_int4(qweight)
    acc = _int_matmul(qx, qw)
    y = acc * sx * weight_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], qweight.shape[0])


def _int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact `a @ bᵀ` of int8 matrices, as float32 (sums below 2^24 in every realistic layer)."""
    if a.device.type == "cpu" or (a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[0] % 8 == 0):
        try:
            return torch._int_mm(a.contiguous(), b.t().contiguous()).float()
        except RuntimeError:
            pass
    return (a.double() @ b.double().t()).float()


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
    if config.weight_bits != 4:
        return f"weight_bits: scheme 'convrot_w4a4' stores int4 weights, got {config.weight_bits!r}"
    if config.act_bits not in (4, 8):
        return f"act_bits: scheme 'convrot_w4a4' quantizes tokens to int4 (4) or int8 (8), got {config.act_bits!r}"
    if config.input_transform != "none":
        return (
            "input_transform: scheme 'convrot_w4a4' applies its own Hadamard rotation; "
            f"expected 'none', got {config.input_transform!r}"
        )
    return None


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


def pack(layer: Any, config: QVGenConfig, dtype: torch.dtype, name: str) -> ConvRotLinear:
    out = shell(layer, config, 0, dtype, layer.weight.device)
    out.load_state_dict({k: v.to(getattr(out, k).dtype) for k, v in export(layer).items()})
    return out


SCHEME = Scheme(
    name=COMFY_FORMAT,
    file_format="comfy",
    check=check,
    unsupported=unsupported,
    quantizers=quantizers,
    rotate=rotate,
    export=export,
    shell=shell,
    pack=pack,
    inference_types=(ConvRotLinear,),
)
