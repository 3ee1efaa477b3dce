"""NVFP4 (ComfyUI's `nvfp4`, comfy-kitchen's `TensorCoreNVFP4Layout`) as a QAT target and in PyTorch.

What comfy-kitchen computes, reproduced bit for bit (its eager `quantize_nvfp4` / `dequantize_nvfp4`):

- a tensor `x` (rows × K, K a multiple of 16; rows zero-padded to a multiple of 16) is cut into blocks
  of 16 along K;
- a global scale `s2` (float32 scalar): `amax|x| / (448 · 6)` by default (448 = fp8 e4m3 max, 6 = e2m1
  max), computed in `x`'s dtype; stored as `weight_scale_2` for weights, `input_scale` for activations;
- per block an fp8 e4m3 scale `s_b = fp8(min(amax_block / 6 / s2, 448))` (round to nearest even;
  blocks whose scale underflows to 0 quantize to 0);
- codes `q = e2m1(clamp(x / (s2 · s_b), -6, 6))`: round to nearest even on {0, .5, 1, 1.5, 2, 3, 4, 6}
  with a sign bit; two codes per byte, the even column in the *high* nibble (comfy-kitchen's default);
- dequantized `q · (s2 · s_b)`, the scale product taken in the output dtype (bf16 in ComfyUI);
- `weight_scale` (the fp8 block scales) is stored in cuBLAS's swizzled 128×4 tile layout, padded to
  (⌈rows/128⌉·128, ⌈K/16/4⌉·4).

At run time ComfyUI quantizes a layer's input the same way, per call, with `input_scale` as `s2`
(or `amax|x| / 2688` of the whole call when the file has none) and multiplies in FP4 on GPUs with
FP4 tensor cores (compute capability ≥ 10: B200, RTX 50); elsewhere it dequantizes the weight and
runs a plain bf16 linear with the input *not* quantized (W4A16).

Learnable in training (the format stores the scales, so any value is deployable exactly):
- weights: a clip factor per block in [0.25, 1] multiplying `amax_block` (LSQ-style gradient through
  both roundings); at 1 the codes are exactly those of comfy-kitchen's quantizer. `s2` follows the
  weight (`amax / 2688`, as comfy-kitchen's quantizer picks it).
- activations: `input_scale = clip · amax_calib / 2688`, with `amax_calib` the largest |input| of the
  first batch(es) seen and a learnable `clip`; the input scale only bounds the largest block scale
  (448 · s2), so it acts as a learned clipping level of the activations.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..quantizers import clamp_ste_edges, grad_scale
from .base import Scheme, fixed_arithmetic, pack_via_state_dict

if TYPE_CHECKING:
    from ..config import QVGenConfig

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
GLOBAL_DIV = E4M3_MAX * E2M1_MAX  # 2688: amax → global scale
COMFY_FORMAT = "nvfp4"
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # code & 7 indexes this; code & 8 is the sign
WEIGHT_CLIP_MIN = 0.25
INPUT_CLIP_MIN = 1e-3
TILE_ROWS, TILE_COLS = 128, 4  # cuBLAS block-scale tile


def roundup(n: int, m: int) -> int:
    return (n + m - 1) // m * m


# ---- the arithmetic --------------------------------------------------------------------------------
def global_scale(x: Tensor) -> Tensor:
    """comfy-kitchen's default `s2 = amax|x| / 2688`, divided in `x`'s dtype, as float32 scalar.

    One deliberate difference: an all-zero `x` gets `s2 = 1` (its blocks then quantize to 0);
    comfy-kitchen divides 0 by 0 there and returns NaN.
    """
    s = (x.detach().abs().amax() / GLOBAL_DIV).to(torch.float32)
    return torch.where(s > 0, s, torch.ones_like(s))


def round_e2m1(v: Tensor) -> Tensor:
    """Round float32 values in [-6, 6] to the e2m1 grid, ties to even mantissa (as the hardware).

    The grid step is 0.5 below 2, 1 below 4 and 2 above; on each range `round(|v| / step)` (ties to
    even) picks the code with the even mantissa, and the divisions by powers of two are exact.
    """
    a = v.abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return torch.copysign(torch.round(a / step) * step, v)


def fp8_round(x: Tensor) -> Tensor:
    """Round float32 to fp8 e4m3 (nearest even, subnormals kept) and back to float32."""
    return x.to(torch.float8_e4m3fn).to(torch.float32)


def _ste(x: Tensor, rounded: Tensor) -> Tensor:
    return x + (rounded - x).detach()


def block_scales(x: Tensor, s2: Tensor, clip: Tensor | None = None) -> Tensor:
    """fp8 block scales (as float32, shape (rows, K/16)) of a 2-D `x`; gradient to `clip` and `s2`."""
    amax = x.detach().reshape(x.shape[0], -1, BLOCK).abs().amax(dim=-1).to(torch.float32)
    if clip is not None:
        amax = amax * clip
    scaled = clamp_ste_edges(amax / E2M1_MAX / s2, hi=E4M3_MAX)
    return _ste(scaled, fp8_round(scaled.detach()))


def quantize_blocks(x: Tensor, s2: Tensor, sb: Tensor) -> tuple[Tensor, Tensor]:
    """e2m1 values (float32, STE) of a 2-D `x` as (rows, K/16, 16), and the values before rounding
    (whose sign bit the codes keep: comfy-kitchen stores a small negative value as -0)."""
    total = s2 * sb
    zero = total == 0
    safe = torch.where(zero, torch.ones_like(total), total)
    v = x.to(torch.float32).reshape(x.shape[0], -1, BLOCK) / safe.unsqueeze(-1)
    v = torch.where(zero.unsqueeze(-1), torch.zeros_like(v), v)
    v = torch.clamp(v, -E2M1_MAX, E2M1_MAX)
    return _ste(v, round_e2m1(v.detach())), v


def fake_quant(
    x: Tensor,
    s2: Tensor | None = None,
    clip: Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """NVFP4 quantize → dequantize of `x` (…, K), identical to comfy-kitchen's pair for 2-D inputs.

    `s2`: the global scale (None: `global_scale(x)`, comfy-kitchen's recalculation); `clip`: block clip
    factors (rows, K/16) or None. Dequantized in `out_dtype` (default `x`'s), the scale product in that
    dtype as comfy-kitchen's `dequantize_nvfp4` takes it. Straight-through gradients.
    """
    shape, k = x.shape, x.shape[-1]
    if k % BLOCK:
        raise ValueError(f"NVFP4: {k} features are not a multiple of the block size {BLOCK}")
    out_dtype = out_dtype or x.dtype
    x2 = x.reshape(-1, k)
    s2 = global_scale(x2) if s2 is None else s2.to(torch.float32)
    sb = block_scales(x2, s2, clip)
    q, _ = quantize_blocks(x2, s2, sb)
    scale = s2.to(out_dtype) * sb.to(out_dtype)
    return (q.to(out_dtype) * scale.unsqueeze(-1)).reshape(shape)


# ---- storage: codes, packing, swizzled scales -------------------------------------------------------
def e2m1_codes(values: Tensor) -> Tensor:
    """4-bit codes (uint8) of values already on the e2m1 grid: magnitude index | sign << 3."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=values.device)
    idx = torch.bucketize(values.abs().to(torch.float32), grid)
    return (idx | (torch.signbit(values).to(torch.int64) << 3)).to(torch.uint8)


def e2m1_values(codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of `e2m1_codes`."""
    lut = torch.tensor(E2M1_GRID + tuple(-v for v in E2M1_GRID), dtype=dtype, device=codes.device)
    return lut[codes.to(torch.int64)]


def pack_fp4(codes: Tensor) -> Tensor:
    """(rows, K) 4-bit codes → (rows, K/2) uint8, even column in the high nibble."""
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack_fp4(packed: Tensor) -> Tensor:
    """Inverse of `pack_fp4`."""
    p = packed.view(torch.uint8)
    return torch.stack((p >> 4, p & 0xF), dim=-1).reshape(*p.shape[:-1], -1)


def swizzle_scales(s: Tensor) -> Tensor:
    """(rows, nb) block scales → cuBLAS's tiled layout: zero-padded to 128-row × 4-column tiles, tiles
    in row-major order, and inside a tile row `32·i + j`, column `c` at offset `16·j + 4·i + c`."""
    rows, cols = s.shape
    r, c = roundup(rows, TILE_ROWS), roundup(cols, TILE_COLS)
    p = torch.zeros(r, c, dtype=s.dtype, device=s.device)
    p[:rows, :cols] = s
    tiles = p.reshape(r // TILE_ROWS, 4, 32, c // TILE_COLS, TILE_COLS).permute(0, 3, 2, 1, 4)
    return tiles.reshape(r, c)


def unswizzle_scales(s: Tensor, rows: int, cols: int) -> Tensor:
    """Inverse of `swizzle_scales`, cut back to (rows, cols)."""
    r, c = s.shape
    if r != roundup(rows, TILE_ROWS) or c != roundup(cols, TILE_COLS):
        raise ValueError(f"NVFP4 block scales: expected shape {(roundup(rows, 128), roundup(cols, 4))}, got {(r, c)}")
    tiles = s.reshape(r // TILE_ROWS, c // TILE_COLS, 32, 4, TILE_COLS).permute(0, 3, 2, 1, 4)
    return tiles.reshape(r, c)[:rows, :cols]


@torch.no_grad()
def quantize_weight(w: Tensor, clip: Tensor | None = None) -> dict[str, Tensor]:
    """ComfyUI's tensors of an NVFP4 weight: `weight` uint8 (out, K/2), `weight_scale` fp8 (swizzled),
    `weight_scale_2` float32 scalar (what comfy-kitchen's `TensorCoreNVFP4Layout.quantize` stores
    when `clip` is None). Rows are zero-padded to a multiple of 16, as comfy-kitchen pads them."""
    w = w.detach()
    s2 = global_scale(w)
    pad = roundup(w.shape[0], BLOCK) - w.shape[0]
    if pad:
        w = torch.nn.functional.pad(w, (0, 0, 0, pad))
        clip = None if clip is None else torch.nn.functional.pad(clip, (0, 0, 0, pad), value=1.0)
    sb = block_scales(w, s2, clip)
    _, v = quantize_blocks(w, s2, sb)
    return {
        "weight": pack_fp4(e2m1_codes(round_e2m1(v).reshape(w.shape))),
        "weight_scale": swizzle_scales(sb.to(torch.float8_e4m3fn)),
        "weight_scale_2": s2.reshape(()).clone(),
    }


def dequantize_weight(
    weight: Tensor,
    weight_scale: Tensor,
    weight_scale_2: Tensor,
    dtype: torch.dtype = torch.float32,
    out_features: int | None = None,
) -> Tensor:
    """`q · (s2 · s_b)` in `dtype` from the stored tensors, as comfy-kitchen's `dequantize_nvfp4`
    (cut to `out_features` rows when the stored rows are padded)."""
    rows, k = weight.shape[0], weight.shape[1] * 2
    sb = unswizzle_scales(weight_scale.view(torch.float8_e4m3fn), rows, k // BLOCK)
    scale = weight_scale_2.to(dtype) * sb.to(dtype)
    q = e2m1_values(unpack_fp4(weight), dtype).reshape(rows, -1, BLOCK)
    return (q * scale.unsqueeze(-1)).reshape(rows, k)[: out_features or rows]


def nvfp4_linear(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    weight_scale_2: Tensor,
    bias: Tensor | None = None,
    input_scale: Tensor | None = None,
    *,
    quantize_input: bool = True,
) -> Tensor:
    """An NVFP4 layer in PyTorch: dequantized weight, input quantized per call as ComfyUI does on
    FP4 GPUs (`quantize_input=False`: the W4A16 path ComfyUI takes on every other device)."""
    w = dequantize_weight(weight, weight_scale, weight_scale_2, x.dtype, None if bias is None else bias.shape[0])
    if quantize_input:
        x = fake_quant(x, input_scale)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


# ---- training form -----------------------------------------------------------------------------------
class NVFP4WeightQuantizer(nn.Module):
    """Fake NVFP4 weight with a learnable clip per 16-element block (LSQ gradient scaling)."""

    bits = 4

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        if in_features % BLOCK:
            raise ValueError(f"NVFP4: in_features {in_features} is not a multiple of {BLOCK}")
        self.block_clip = nn.Parameter(torch.ones(out_features, in_features // BLOCK))
        self.grad_factor = 1.0 / math.sqrt(BLOCK * E2M1_MAX)

    @torch.no_grad()
    def init_from(self, weight: Tensor) -> None:
        """Clip 1: comfy-kitchen's own absmax block scales."""
        self.block_clip.fill_(1.0)

    def clip(self) -> Tensor:
        c = grad_scale(self.block_clip, self.grad_factor)
        return clamp_ste_edges(c, WEIGHT_CLIP_MIN, 1.0)

    def forward(self, weight: Tensor) -> Tensor:
        w = weight.float()
        return fake_quant(w, global_scale(w), self.clip()).to(weight.dtype)

    def export(self, weight: Tensor) -> dict[str, Tensor]:
        return quantize_weight(weight.float(), self.clip().detach())


class NVFP4ActQuantizer(nn.Module):
    """Fake NVFP4 input with a static, learnable `input_scale = clip · amax / 2688`.

    `amax` is taken from the first batch the layer sees in training (the maximum over processes when
    distributed) unless set before; `clip` starts at 1.
    """

    bits = 4

    def __init__(self, in_features: int) -> None:
        super().__init__()
        # shape (1,), not (): sharding wrappers (FSDP) flatten and split parameters along dim 0
        self.clip = nn.Parameter(torch.ones(1))
        self.register_buffer("amax", torch.zeros(1))
        self.grad_factor = 1.0 / math.sqrt(in_features * E2M1_MAX)

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        amax = x.detach().abs().amax().float().reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX)
        self.amax.copy_(torch.maximum(self.amax, amax))

    def input_scale(self) -> Tensor:
        c = clamp_ste_edges(grad_scale(self.clip, self.grad_factor), lo=INPUT_CLIP_MIN)
        return c * self.amax / GLOBAL_DIV

    def export_scale(self) -> Tensor:
        return self.input_scale().detach().float().reshape(()).clone()

    def forward(self, x: Tensor, bucket: Tensor | int = 0) -> Tensor:  # bucket: same call as ActQuantizer
        if not self.amax > 0:
            self.calibrate(x)
        if not self.amax > 0:  # an all-zero input: nothing to quantize yet
            return x
        return fake_quant(x, self.input_scale(), out_dtype=x.dtype)


# ---- inference form ----------------------------------------------------------------------------------
class NVFP4Linear(nn.Module):
    """Inference form of a ComfyUI `nvfp4` layer, with ComfyUI's tensor names: dequantized weight,
    input quantized as on FP4 GPUs (`quantize_input = False`: ComfyUI's path everywhere else)."""

    keep_dtype = ("weight_scale", "weight_scale_2", "input_scale")  # stored dtypes, never the compute dtype

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        *,
        input_scale: bool = True,
        quantize_input: bool = True,
    ) -> None:
        super().__init__()
        if in_features % BLOCK:
            raise ValueError(f"NVFP4 needs in_features divisible by {BLOCK}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.quantize_input = quantize_input
        rows = roundup(out_features, BLOCK)
        frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
        # `weight_scale_2` first: `next(module.parameters()).dtype` must be a float dtype (see PackedLinear)
        self.weight_scale_2 = frozen(torch.ones((), device=device))
        self.weight = frozen(torch.zeros(rows, in_features // 2, dtype=torch.uint8, device=device))
        sb = torch.zeros(roundup(rows, TILE_ROWS), roundup(in_features // BLOCK, TILE_COLS), device=device)
        self.weight_scale = frozen(sb.to(torch.float8_e4m3fn))
        self.input_scale = frozen(torch.ones((), device=device)) if input_scale else None
        self.bias = frozen(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @property
    def rank(self) -> int:
        return 0

    def forward(self, x: Tensor) -> Tensor:
        w = self.dequantize_weight(x.dtype)
        if self.quantize_input:
            x = fake_quant(x, self.input_scale)
        return torch.nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_weight(self.weight, self.weight_scale, self.weight_scale_2, dtype, self.out_features)

    def extra_repr(self) -> str:
        a = 4 if self.quantize_input else 16
        return f"in={self.in_features}, out={self.out_features}, W4A{a}, nvfp4"


# ---- the scheme ----------------------------------------------------------------------------------------
def check(config: QVGenConfig) -> str | None:
    """NVFP4 fixes the arithmetic: FP4 weights and inputs, no input transform ComfyUI could not apply."""
    return fixed_arithmetic(
        config,
        "nvfp4",
        weight_bits="4-bit (e2m1) weights",
        act_bits={4: "4-bit e2m1"},
        input_transform="none",
        transform_note="runs ComfyUI's nvfp4 layers, which apply no rotation or smoothing",
    )


def unsupported(in_features: int) -> str | None:
    if in_features % BLOCK == 0:
        return None
    return f"NVFP4 needs in_features divisible by {BLOCK}: {in_features} is not"


def quantizers(out_features: int, in_features: int, config: QVGenConfig) -> tuple[nn.Module, nn.Module]:
    return NVFP4WeightQuantizer(out_features, in_features), NVFP4ActQuantizer(in_features)


def comfy_layer_conf(config: QVGenConfig) -> dict:
    """The per-layer entry ComfyUI reads (`comfy_quant` / `_quantization_metadata`)."""
    return {"format": COMFY_FORMAT}


@torch.no_grad()
def export(layer: Any) -> dict[str, Tensor]:
    """ComfyUI's `nvfp4` tensors of a trained `QVGenLinear` (Φ must have decayed to rank 0)."""
    if layer.rank > 0:
        raise ValueError(
            f"layer has Φ rank {layer.rank}; ComfyUI's nvfp4 format has no low-rank branch "
            "(train until the rank decay reaches 0)"
        )
    out = layer.weight_quantizer.export(layer.weight)
    aq = layer.act_quantizer
    if not aq.amax > 0:
        raise ValueError("its input scale was never calibrated (run at least one forward pass before export)")
    out["input_scale"] = aq.export_scale()
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().float().clone()
    return out


def shell(
    linear: nn.Module, config: QVGenConfig, rank: int, dtype: torch.dtype, device: torch.device | str
) -> NVFP4Linear:
    if rank:
        raise ValueError("NVFP4 layers have no Φ: the rank must have decayed to 0")
    return NVFP4Linear(linear.in_features, linear.out_features, linear.bias is not None, dtype, device)


SCHEME = Scheme(
    name=COMFY_FORMAT,
    file_format="comfy",
    check=check,
    unsupported=unsupported,
    quantizers=quantizers,
    rotate=None,
    export=export,
    shell=shell,
    pack=pack_via_state_dict(shell, export),
    inference_types=(NVFP4Linear,),
)
