"""Grouped W4A8 (comfy-kitchen's `AsymW4A8Int8Layout`, ComfyUI format `asym_w4a8_int8`) for QAT.

The layout stores a ConvRot-rotated weight (groups of 256 along K, the regular Hadamard of
`qvgen.convrot`) as 4-bit codes into a 16-level codebook, per group of 16 weights along K:

    level(q)  = codebook[q]                                   (16 sorted floats in [-1, 1])
    v         = clamp(round(level(q) · s_rel[n, g]), -127, 127)   (an int8 value)
    W_rot[n]  ≈ s_channel[n] · v

`s_rel` is float8 e4m3 `(out, K/16)`, `s_channel` float32 `(out,)`. At run time each token is
rotated the same way, quantized to int8 with its own absmax scale (`max|x| / 127`, clamp
[-128, 127]) and multiplied in an int8 GEMM: on every GPU with int8 MMA (Ampere, Ada, Hopper) and
in the eager/Triton backends alike. Despite the layout's name this is the *symmetric* codebook
variant, the layout's default; its asymmetric variant (uniform codes with a per-group
`correction`) is run by every comfy-kitchen backend as a dequantized weight times the unquantized
input (W4A16), and ComfyUI's loader does not read `weight_correction`, so it is not a target here.

Training form: the codes are re-chosen every step as the nearest grid level (ties to the lower
index, as comfy-kitchen's quantizer does); `s_channel` and `s_rel` are learnable (LSQ-style
gradients, `s_rel` rounded to e4m3 in the forward pass, straight through); the weight gets the
straight-through gradient. The initial scales are exactly what comfy-kitchen's quantizer
`quantize_w4a8_int8_weight(…, codebook_tensor=<the fixed table>)` picks (two least-squares passes
over the group scale, then the grid assignment).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..quantizers import clamp_ste_edges, round_ste
from .base import Scheme, fixed_arithmetic, pack_via_state_dict
from .convrot import CONVROT_GROUP, int_matmul, rotate
from .svdquant import cast_ste, scale_grad

if TYPE_CHECKING:
    from ..config import QVGenConfig

GROUP = 16  # the layout's default group size along K (what its CUDA decode kernels take)
INT8_MAX = 127
SCALE_MIN = 1e-8
ALS_ITERS = 2
COMFY_FORMAT = "asym_w4a8_int8"
SCALE_DTYPE = torch.float8_e4m3fn
# The layout's fixed 16-level table (Lloyd-Max levels of a group-normalized Gaussian): the format's
# constant, stored in every exported layer as `weight_codebook`.
CODEBOOK = (
    -0.980602, -0.794529, -0.638165, -0.500986, -0.377321, -0.263187, -0.155210, -0.050720,
    0.052541, 0.156985, 0.265284, 0.379533, 0.502636, 0.638953, 0.794876, 0.980671,
)  # fmt: skip


def codebook(device: torch.device | str = "cpu") -> Tensor:
    return torch.tensor(CODEBOOK, dtype=torch.float32, device=device)


ROTATION_GROUPS = (CONVROT_GROUP, 64, 16)  # regular Hadamard sizes (powers of 4) the layout accepts


def rotation_group(in_features: int) -> int:
    """The layer's ConvRot group: 256 where K allows it, else 64 or 16 (the layout's `convrot_groupsize`); 0: none."""
    return next((g for g in ROTATION_GROUPS if in_features % g == 0), 0)


def supports(in_features: int, group: int = GROUP) -> bool:
    """Whether the layout can hold a layer with this K: a rotation group divides K, and so does the code group."""
    return in_features > 0 and rotation_group(in_features) > 0 and in_features % group == 0


# ---- codes ---------------------------------------------------------------------------------------
def nearest_index(target: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest of the sorted `levels` (last dim) for each `target`; ties to the lower index.

    `levels` is `(…, L)` broadcastable against `target`'s leading dims with a last dim of its own;
    `target` `(…, n)`. Binary search, then the closer of the two neighbours.
    """
    lv = levels.expand(*target.shape[:-1], levels.shape[-1]).contiguous()
    last = lv.shape[-1] - 1
    pos = torch.searchsorted(lv, target.contiguous())
    lo = (pos - 1).clamp(0, last)
    hi = pos.clamp(0, last)
    dlo = (target - lv.gather(-1, lo)).abs()
    dhi = (target - lv.gather(-1, hi)).abs()
    return torch.where(dhi < dlo, hi, lo)


def grid_levels(s_rel: Tensor, table: Tensor) -> Tensor:
    """The int8 value each code decodes to per group, `(out, K/16, 16)`: clamp(round(level · s_rel), ±127)."""
    return clamp_ste_edges(round_ste(table * s_rel.float().unsqueeze(-1)), -INT8_MAX, INT8_MAX)


def _grouped(w: Tensor, group: int) -> Tensor:
    n, k = w.shape
    return w.float().view(n, k // group, group)


@torch.no_grad()
def init_scales(w_rot: Tensor, group: int = GROUP) -> tuple[Tensor, Tensor]:
    """`(s_rel as e4m3 (out, K/16), s_channel (out,))` of a rotated weight, as comfy-kitchen's quantizer picks them."""
    g = _grouped(w_rot, group)
    table = codebook(w_rot.device)
    scale = g.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_MIN)
    q = nearest_index(g / scale, table)
    for _ in range(ALS_ITERS):
        lv = table[q]
        scale = ((g * lv).sum(-1, keepdim=True) / (lv * lv).sum(-1, keepdim=True).clamp(min=SCALE_MIN)).clamp(
            min=SCALE_MIN
        )
        q = nearest_index(g / scale, table)
    s_channel = ((table[q] * scale).abs().amax(dim=(1, 2)) / INT8_MAX).clamp(min=SCALE_MIN)
    s_rel = (scale.squeeze(-1) / s_channel.unsqueeze(1)).float().to(SCALE_DTYPE)
    return s_rel, s_channel.float()


def assign_codes(w_rot: Tensor, s_rel: Tensor, s_channel: Tensor, group: int = GROUP) -> Tensor:
    """Codes 0..15 `(out, K)` (int32): the nearest decoded grid value to `W_rot / s_channel` in each group."""
    g = _grouped(w_rot, group)
    levels = grid_levels(s_rel, codebook(w_rot.device))
    return nearest_index(g / s_channel.float().view(-1, 1, 1), levels).to(torch.int32).flatten(1)


def pack_codes(codes: Tensor) -> Tensor:
    """Unsigned 4-bit codes `(out, K)` → int8 `(out, K/2)`, even column in the low nibble (the layout's storage)."""
    c = codes.to(torch.int32)
    return ((c[:, 0::2] & 0xF) | ((c[:, 1::2] & 0xF) << 4)).to(torch.uint8).view(torch.int8)


def unpack_codes(packed: Tensor) -> Tensor:
    """Inverse of `pack_codes`: int8 `(out, K/2)` → codes 0..15 (int64) `(out, K)`."""
    b = packed.view(torch.uint8).to(torch.int64)
    return torch.stack((b & 0xF, (b >> 4) & 0xF), dim=-1).flatten(-2)


def int8_weight(packed: Tensor, s_rel: Tensor, table: Tensor, group: int = GROUP) -> Tensor:
    """The int8 grid values `(out, K)` the GEMM consumes (the layout's decode), as float32."""
    codes = unpack_codes(packed)
    n, k = codes.shape
    vals = table.float()[codes].view(n, k // group, group) * s_rel.float().unsqueeze(-1)
    return vals.round().clamp(-INT8_MAX, INT8_MAX).view(n, k)


def fake_quant_weight(w_rot: Tensor, s_rel: Tensor, s_channel: Tensor, group: int = GROUP) -> Tensor:
    """`s_channel · grid[code]` with the straight-through gradient to the weight (and LSQ-style ones to the scales)."""
    g = _grouped(w_rot, group)
    sc = s_channel.view(-1, 1, 1)
    t = g / sc
    levels = grid_levels(s_rel, codebook(w_rot.device))
    idx = nearest_index(t.detach(), levels.detach())
    v = levels.gather(-1, idx) + (t - t.detach())
    return (v * sc).view_as(w_rot)


# ---- activations and the layer -------------------------------------------------------------------
def act_scale(x_rot: Tensor) -> Tensor:
    """Per-token int8 scale (float32, `(…, 1)`): `max|x| / 127`, floored at 1e-30 (the layout's rowwise quantizer)."""
    return (x_rot.abs().amax(dim=-1, keepdim=True).float() / INT8_MAX).clamp(min=1e-30)


def _scale_for_math(scale: Tensor, x: Tensor) -> Tensor:
    s = scale.to(x.dtype)
    return torch.where(s == 0, torch.full_like(s, torch.finfo(x.dtype).tiny), s)


def quantize_acts(x_rot: Tensor) -> tuple[Tensor, Tensor]:
    """Int8 codes (`x / s` in `x`'s dtype, rounded, clamped to [-128, 127]) and float32 scales of rotated tokens."""
    s = act_scale(x_rot)
    return torch.round(x_rot / _scale_for_math(s, x_rot)).clamp(-128, 127).to(torch.int8), s


def fake_quant_acts(x_rot: Tensor) -> Tensor:
    """`s · q` of `quantize_acts` with straight-through rounding (float32)."""
    s = act_scale(x_rot)
    q = clamp_ste_edges(round_ste(x_rot / _scale_for_math(s, x_rot)), -128, 127)
    return q.float() * s


def w4a8_linear(
    x: Tensor,
    qweight: Tensor,
    s_rel: Tensor,
    s_channel: Tensor,
    table: Tensor,
    bias: Tensor | None = None,
    *,
    group: int = GROUP,
    convrot_group: int = CONVROT_GROUP,
) -> Tensor:
    """One W4A8 layer in plain PyTorch: rotate, int8 tokens, int8 × grid GEMM (exact integer sums), scale.

    The integer products are summed exactly (`torch._int_mm` or float64) and scaled in float32,
    as comfy-kitchen's int8 GEMM does; the result is cast to `x`'s dtype.
    """
    shape = x.shape
    k = shape[-1]
    if qweight.shape[-1] * 2 != k:
        raise ValueError(f"W4A8: input has {k} features but the packed weight holds {qweight.shape[-1] * 2}")
    qx, sx = quantize_acts(rotate(x.reshape(-1, k), convrot_group))
    wq = int8_weight(qweight, s_rel, table, group).to(torch.int8)
    y = int_matmul(qx, wq) * (sx * s_channel.float().reshape(1, -1))
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], qweight.shape[0])


class GroupedCodebookQuantizer(nn.Module):
    """Training form of the weight side: learnable `s_channel` (float32) and `s_rel` (e4m3 in the forward).

    Both are learned as relative gains on their initial values (`s = s0 · (1 + g)`, `g` starting at 0,
    so the start is bit for bit comfy-kitchen's): `s_channel` is about max|W| / 127 (~1e-3), and an
    optimizer step of the weights' learning rate on the raw value would change it by tens of percent.
    """

    def __init__(self, out_features: int, in_features: int, group: int = GROUP) -> None:
        super().__init__()
        if not supports(in_features, group):
            raise ValueError(f"W4A8 needs in_features divisible by 16 and by {group}, got {in_features}")
        self.bits = 4
        self.group = group
        self.register_buffer("s_channel0", torch.ones(out_features))
        self.register_buffer("s_rel0", torch.ones(out_features, in_features // group))
        self.channel_gain = nn.Parameter(torch.zeros(out_features))
        self.rel_gain = nn.Parameter(torch.zeros(out_features, in_features // group))
        self.channel_grad = 1.0 / math.sqrt(in_features * INT8_MAX)
        self.rel_grad = 1.0 / math.sqrt(group * INT8_MAX)

    @torch.no_grad()
    def init_from(self, weight: Tensor) -> None:
        s_rel, s_channel = init_scales(weight.detach(), self.group)
        self.s_rel0.copy_(s_rel.float())
        self.s_channel0.copy_(s_channel)
        self.channel_gain.zero_()
        self.rel_gain.zero_()

    def effective_scales(self) -> tuple[Tensor, Tensor]:
        rel = self.s_rel0 * (1 + scale_grad(self.rel_gain, self.rel_grad))
        channel = self.s_channel0 * (1 + scale_grad(self.channel_gain, self.channel_grad))
        return cast_ste(rel.clamp(min=0), SCALE_DTYPE), channel.clamp(min=SCALE_MIN)

    def forward(self, weight: Tensor) -> Tensor:
        s_rel, s_channel = self.effective_scales()
        return fake_quant_weight(weight.float(), s_rel, s_channel, self.group).to(weight.dtype)

    @torch.no_grad()
    def export(self, weight: Tensor) -> dict[str, Tensor]:
        """The layout's tensors: packed codes, `s_rel` (e4m3), `s_channel`, `codebook` (layer-relative names)."""
        s_rel, s_channel = (s.detach() for s in self.effective_scales())
        s_rel = s_rel.to(SCALE_DTYPE)
        codes = assign_codes(weight.detach(), s_rel, s_channel, self.group)
        return {
            "weight": pack_codes(codes),
            "weight_s_rel": s_rel.contiguous(),
            "weight_s_channel": s_channel.float().contiguous().clone(),
            "weight_codebook": codebook(weight.device),
        }


class Int8TokenQuantizer(nn.Module):
    """Dynamic per-token int8 absmax quantizer of rotated inputs (no parameters: the layout has none)."""

    def __init__(self) -> None:
        super().__init__()
        self.bits = 8

    def forward(self, x: Tensor, bucket: Tensor | int = 0) -> Tensor:  # bucket: same call as ActQuantizer
        return fake_quant_acts(x).to(x.dtype)


class W4A8Linear(nn.Module):
    """Inference form of a ComfyUI `asym_w4a8_int8` layer, with ComfyUI's tensor names (PyTorch, exact int GEMM)."""

    keep_dtype = ("weight_s_channel", "weight_s_rel", "weight_codebook")  # the format's dtypes, not the compute one

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        group: int = GROUP,
        convrot_group: int | None = None,
    ) -> None:
        super().__init__()
        if not supports(in_features, group):
            raise ValueError(f"W4A8 needs in_features divisible by 16 and by {group}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.group = group
        self.convrot_group = convrot_group or rotation_group(in_features)

        def p(t: Tensor) -> nn.Parameter:
            return nn.Parameter(t, requires_grad=False)

        # `weight_s_channel` first: `next(module.parameters()).dtype` must be a float dtype
        self.weight_s_channel = p(torch.ones(out_features, device=device))
        self.weight = p(torch.zeros(out_features, in_features // 2, dtype=torch.int8, device=device))
        self.weight_s_rel = p(torch.ones(out_features, in_features // group, device=device).to(SCALE_DTYPE))
        self.weight_codebook = p(codebook(device or "cpu"))
        self.bias = p(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @property
    def rank(self) -> int:
        return 0

    def forward(self, x: Tensor) -> Tensor:
        return w4a8_linear(
            x,
            self.weight,
            self.weight_s_rel,
            self.weight_s_channel,
            self.weight_codebook,
            self.bias,
            group=self.group,
            convrot_group=self.convrot_group,
        )

    @torch.no_grad()
    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """`s_channel · grid[code]` rotated back to the original input space."""
        w = int8_weight(self.weight, self.weight_s_rel, self.weight_codebook, self.group)
        return rotate(w * self.weight_s_channel.float()[:, None], self.convrot_group).to(dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, W4A8 g{self.group}, "
            f"convrot {self.convrot_group}, asym_w4a8_int8"
        )


# ---- the scheme ----------------------------------------------------------------------------------
SCHEME_NAME = "w4a8_int8"


def rotate_input(x: Tensor) -> Tensor:
    """The layer's ConvRot rotation (group chosen from K), for inputs and weight rows alike."""
    return rotate(x, rotation_group(x.shape[-1]))


def check(config: QVGenConfig) -> str | None:
    """W4A8 fixes 4-bit codebook weights, int8 tokens and its own rotation; the format has no low-rank branch."""
    return fixed_arithmetic(
        config,
        SCHEME_NAME,
        weight_bits="4-bit codes",
        act_bits={8: "int8"},
        input_transform="none",
        transform_note="applies its own Hadamard rotation",
    )


def unsupported(in_features: int) -> str | None:
    return None if supports(in_features) else f"W4A8 needs in_features divisible by 16, got {in_features}"


def quantizers(out_features: int, in_features: int, config: QVGenConfig) -> tuple[nn.Module, nn.Module]:
    return GroupedCodebookQuantizer(out_features, in_features), Int8TokenQuantizer()


@torch.no_grad()
def export(layer: Any) -> dict[str, Tensor]:
    """ComfyUI's `asym_w4a8_int8` tensors of a trained `QVGenLinear` (Φ must have decayed to rank 0)."""
    if layer.rank > 0:
        raise ValueError(
            f"layer has Φ rank {layer.rank}; ComfyUI's asym_w4a8_int8 format has no low-rank branch "
            "(train until the rank decay reaches 0)"
        )
    out = layer.weight_quantizer.export(layer.weight)
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().float().clone()
    return out


def shell(
    linear: nn.Module, config: QVGenConfig, rank: int, dtype: torch.dtype, device: torch.device | str
) -> W4A8Linear:
    if rank:
        raise ValueError("W4A8 layers have no Φ: the rank must have decayed to 0")
    return W4A8Linear(linear.in_features, linear.out_features, linear.bias is not None, dtype, device)


def layer_conf(layer: nn.Module, config: QVGenConfig) -> dict:
    k = layer.in_features
    return {"format": COMFY_FORMAT, "group_size": GROUP, "convrot": True, "convrot_groupsize": rotation_group(k)}


def from_comfy(name: str, conf: dict, tensors: dict[str, Tensor], linear: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A `W4A8Linear` holding a ComfyUI file's layer, after checking its entry and every tensor."""
    k, n = linear.in_features, linear.out_features
    group = int(conf.get("group_size", GROUP))
    rg = int(conf.get("convrot_groupsize", CONVROT_GROUP))
    if group != GROUP or rg not in ROTATION_GROUPS or k % rg or not conf.get("convrot", True):
        raise ValueError(
            f"layer '{name}': group_size {group}, convrot_groupsize {rg}, convrot {conf.get('convrot')}; "
            f"this loader reads group_size {GROUP}, a ConvRot group in {ROTATION_GROUPS} dividing K={k}"
        )
    if "weight_correction" in tensors:
        raise ValueError(f"tensor '{name}.weight_correction': the asymmetric variant (runs as W4A16) is not supported")
    want = {
        "weight": ((n, k // 2), (torch.int8, torch.uint8)),
        "weight_s_rel": ((n, k // group), (SCALE_DTYPE, torch.float32)),
        "weight_s_channel": ((n,), (torch.float32,)),
        "weight_codebook": ((16,), (torch.float32,)),
    }
    if linear.bias is not None:
        want["bias"] = ((n,), (torch.float32, torch.bfloat16, torch.float16))
    for key, (shape, dtypes) in want.items():
        t = tensors.get(key)
        if t is None or tuple(t.shape) != shape or t.dtype not in dtypes:
            got = "nothing (missing)" if t is None else f"{t.dtype} of shape {tuple(t.shape)}"
            raise ValueError(f"tensor '{name}.{key}': expected {dtypes[0]} of shape {shape}, got {got}")
    return W4A8Linear(k, n, linear.bias is not None, dtype, group=group, convrot_group=rg)


SCHEME = Scheme(
    name=SCHEME_NAME,
    file_format="comfy",
    check=check,
    unsupported=unsupported,
    quantizers=quantizers,
    rotate=rotate_input,
    export=export,
    shell=shell,
    pack=pack_via_state_dict(shell, export),
    inference_types=(W4A8Linear,),
)
