"""What a packed QVGen layer is made of, and the one way each door makes one.

- `PACKED_TENSORS`: the table of a packed layer's tensors (docs/format.md) with their dtype rule.
  Integer codes, scales, zero points, clipping factors and transform vectors keep the dtype the
  format fixes (scales and zero points stay float32 even when the model runs in bf16); `bias` and
  Φ follow the model's compute dtype. Every loader applies this rule through `tensor_dtype`.
- `assemble`: integer codes + quantizer state → the packed tensors (training export, the authors'
  checkpoint conversion and `quantize_linear` all end here).
- `quantize_linear`: round-to-nearest (plain min/max or QVGen's clip search) of a full-precision
  weight, used by the diffusers quantize-on-load and ComfyUI's Quantize node alike, so both give the
  same bits for the same weights and settings.

`qvgen.packed_linear.PackedLinear.set_tensors` is where a layer is built from these tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .kernels_import import qvgen_kernels
from .quantizers import SCALE_MIN, ActQuantizer, init_weight_qparams, minmax_weight_qparams, quantize_weight_int
from .transforms import hadamard_block, random_signs, rotate, uses_rotation, uses_smoothing

if TYPE_CHECKING:
    from .config import QVGenConfig


class PackedLayerError(ValueError):
    """A packed layer's tensors are missing, of the wrong dtype or of inconsistent shapes."""


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype | None  # None: the model's compute dtype
    shape: str  # for error messages and docs (K = in_features)
    required: bool = False


# Order matters: `weight_scale` first, so `next(layer.parameters()).dtype` is a float dtype (diffusers
# and ComfyUI read a module's dtype that way), never uint8.
PACKED_TENSORS: dict[str, TensorSpec] = {
    "weight_scale": TensorSpec(torch.float32, "(out,)", required=True),
    "qweight": TensorSpec(torch.uint8, "(out, ceil(K/2)) for ≤ 4 bits, else (out, K)", required=True),
    "weight_zero": TensorSpec(torch.float32, "(out,)", required=True),
    "weight_qsum": TensorSpec(torch.int32, "(out,)", required=True),
    "act_clip": TensorSpec(torch.float32, "(n_buckets, 2)"),
    "bias": TensorSpec(None, "(out,)"),
    "phi_down": TensorSpec(None, "(rank, K)"),
    "phi_up": TensorSpec(None, "(out, rank)"),
    "input_signs": TensorSpec(torch.int8, "(K,)"),
    "smooth": TensorSpec(torch.float32, "(K,)"),
    # a layer whose inputs have another width than the config's act_bits (layer_act_bits) carries it
    "input_bits": TensorSpec(torch.uint8, "(1,)"),
}
REQUIRED = tuple(k for k, s in PACKED_TENSORS.items() if s.required)


def tensor_dtype(name: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype tensor `name` of a packed layer has once loaded for a model in `compute_dtype`."""
    fixed = PACKED_TENSORS[name].dtype
    return compute_dtype if fixed is None else fixed


def input_bits_tensor(bits: int, device: torch.device | str | None = None) -> Tensor:
    """The `input_bits` tensor of a layer whose activations have a width of their own."""
    return torch.full((1,), bits, dtype=torch.uint8, device=device)


def read_input_bits(t: Tensor | None, where: str) -> int | None:
    """A layer's own activation width from its `input_bits` tensor (None: absent, or a shape-only `meta` tensor)."""
    if t is None or t.device.type == "meta":
        return None
    if t.dtype != torch.uint8 or tuple(t.shape) != (1,):
        got = f"{t.dtype} of shape {tuple(t.shape)}"
        raise PackedLayerError(f"{where}: tensor 'input_bits': expected uint8 of shape (1,), got {got}")
    bits = int(t[0])
    if not 2 <= bits <= 8:
        raise PackedLayerError(f"{where}: tensor 'input_bits': expected activation bits in 2..8, got {bits}")
    return bits


def check_codes(qweight: Tensor, bits: int, where: str) -> None:
    """Refuse codes above `2^bits − 1` (e.g. 4-bit codes in a file whose config says 3 bits)."""
    if qweight.device.type == "meta" or qweight.numel() == 0:
        return
    qmax = 2**bits - 1
    top = int((torch.maximum(qweight & 0xF, qweight >> 4) if bits <= 4 else qweight).max())
    if top > qmax:
        raise PackedLayerError(
            f"{where}: weight codes up to {top} but weight_bits={bits} allows at most {qmax}; the "
            f"quantization_config does not describe this file (were these {top.bit_length()}-bit codes?)"
        )


@torch.no_grad()
def assemble(
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    bits: int,
    *,
    act_clip: Tensor | None = None,
    bias: Tensor | None = None,
    input_signs: Tensor | None = None,
    smooth: Tensor | None = None,
    phi_down: Tensor | None = None,
    phi_up: Tensor | None = None,
    input_bits: int | None = None,
) -> dict[str, Tensor]:
    """A packed layer's tensors from its integer weight codes (out, K) and quantizer state.

    `input_bits`: the layer's own activation width, when it differs from the config's `act_bits`.

    Fixed-dtype tensors get the table's dtype; bias and Φ are stored in float32 (the loaders cast
    them to the compute dtype). Every tensor is a fresh contiguous copy.
    """
    out_f = codes.shape[0]
    parts: dict[str, Tensor | None] = {
        "weight_scale": scale.reshape(out_f),
        "qweight": qvgen_kernels.pack_weight(codes, bits),
        "weight_zero": zero.reshape(out_f),
        "weight_qsum": codes.to(torch.int32).sum(dim=1),
        "act_clip": act_clip,
        "bias": bias,
        "phi_down": phi_down,
        "phi_up": phi_up,
        "input_signs": input_signs,
        "smooth": smooth,
        "input_bits": None if input_bits is None else input_bits_tensor(input_bits, codes.device),
    }
    return {
        k: t.detach().to(tensor_dtype(k, torch.float32)).contiguous().clone() for k, t in parts.items() if t is not None
    }


def initial_clip_factors(config: QVGenConfig) -> Tensor:
    """The activation clipping factors a fresh training layer starts from, (n_buckets, 2)."""
    aq = ActQuantizer(config.act_bits or 8, config.n_buckets, config.act_fixed_clip, config.act_clip_logit_init)
    return aq.clip_factors().detach()


@torch.no_grad()
def quantize_linear(
    weight: Tensor, bias: Tensor | None, config: QVGenConfig, *, name: str = "", clip_search: bool = True
) -> dict[str, Tensor]:
    """Packed tensors of a full-precision linear layer, without training (rank 0).

    Weights per output channel: plain min/max, or QVGen's clip search (`clip_search`, what a
    training run starts from). Activations: the initial clipping factors of `config`. With a
    rotating `input_transform` the weight is rotated first (signs from `name` and the seed, as in
    training); smoothing without calibration data has scales 1. The result equals the export of
    `QVGenLinear.from_linear(..., init=True)` at rank 0, bit for bit.
    """
    w = weight.detach().float()
    in_f = w.shape[1]
    signs = random_signs(in_f, name, config.transform_seed) if uses_rotation(config.input_transform) else None
    if signs is not None:
        w = rotate(w, signs.to(w.device), hadamard_block(in_f, config.hadamard_block))
    s, z = init_weight_qparams(w, config.weight_bits) if clip_search else minmax_weight_qparams(w, config.weight_bits)
    s = s.clamp(min=SCALE_MIN)
    codes = quantize_weight_int(w, s, z, config.weight_bits)
    bits = config.act_bits_of(name)
    return assemble(
        codes,
        s,
        z,
        config.weight_bits,
        act_clip=initial_clip_factors(config).to(w.device) if config.act_bits is not None else None,
        bias=bias,
        input_signs=signs,
        smooth=torch.ones(in_f, device=w.device) if uses_smoothing(config.input_transform) else None,
        input_bits=None if bits == config.act_bits else bits,
    )


def empty_tensors(
    in_features: int,
    out_features: int,
    *,
    bias: bool,
    weight_bits: int,
    act_bits: int | None,
    n_buckets: int,
    rank: int,
    input_transform: str,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    input_bits: int | None = None,
) -> dict[str, Tensor]:
    """Placeholder tensors of the right shapes and dtypes (a shell a state dict is loaded into);
    `input_bits`: the layer's own activation width (per-layer mixed precision), else no such tensor."""
    width = qvgen_kernels.packed_width(in_features, weight_bits)
    shapes: dict[str, tuple[int, ...] | None] = {
        "weight_scale": (out_features,),
        "qweight": (out_features, width),
        "weight_zero": (out_features,),
        "weight_qsum": (out_features,),
        "act_clip": (n_buckets, 2) if act_bits is not None else None,
        "bias": (out_features,) if bias else None,
        "phi_down": (rank, in_features) if rank else None,
        "phi_up": (out_features, rank) if rank else None,
        "input_signs": (in_features,) if uses_rotation(input_transform) else None,
        "smooth": (in_features,) if uses_smoothing(input_transform) else None,
        "input_bits": (1,) if input_bits is not None else None,
    }
    fill = {"weight_scale": 1.0, "act_clip": 1.0, "input_signs": 1, "smooth": 1.0, "input_bits": input_bits}
    return {
        k: torch.full(shape, fill.get(k, 0), dtype=tensor_dtype(k, dtype), device=device)
        for k, shape in shapes.items()
        if shape is not None
    }


def check_tensors(
    tensors: dict[str, Tensor],
    in_features: int,
    out_features: int,
    *,
    weight_bits: int,
    act_bits: int | None,
    input_transform: str,
    where: str,
) -> None:
    """Names, dtypes and shapes of one layer's packed tensors against the layer they are meant for."""
    unknown = sorted(set(tensors) - set(PACKED_TENSORS))
    if unknown:
        raise PackedLayerError(f"{where}: unknown packed tensors {unknown}; known: {list(PACKED_TENSORS)}")
    for key in REQUIRED:
        if tensors.get(key) is None:
            raise PackedLayerError(f"{where}: tensor '{key}' missing ({PACKED_TENSORS[key].shape})")
    width = qvgen_kernels.packed_width(in_features, weight_bits)
    k = in_features
    rank = tensors["phi_down"].shape[0] if tensors.get("phi_down") is not None else 0
    shapes = {
        "weight_scale": [(out_features,)],
        "qweight": [(out_features, width), (out_features, k)],  # packed, or widened to one code per byte
        "weight_zero": [(out_features,)],
        "weight_qsum": [(out_features,)],
        "act_clip": None,  # (n_buckets, 2), checked below
        "bias": [(out_features,)],
        "phi_down": [(rank, k)],
        "phi_up": [(out_features, rank)],
        "input_signs": [(k,)],
        "smooth": [(k,)],
        "input_bits": [(1,)],
    }
    for key, t in tensors.items():
        if t is None:
            continue
        spec = PACKED_TENSORS[key]
        if spec.dtype is not None and t.dtype != spec.dtype:
            raise PackedLayerError(f"{where}: tensor '{key}': expected {spec.dtype}, got {t.dtype}")
        if spec.dtype is None and not t.is_floating_point():
            raise PackedLayerError(f"{where}: tensor '{key}': expected a float tensor, got {t.dtype}")
        ok = shapes[key] is None or tuple(t.shape) in shapes[key]
        if key == "act_clip":
            ok = t.dim() == 2 and t.shape[1] == 2 and t.shape[0] >= 1
        if not ok:
            want = shapes[key][0] if shapes[key] else "(n_buckets, 2)"
            raise PackedLayerError(
                f"{where}: tensor '{key}': expected shape {want} for a {in_features} → {out_features} "
                f"{weight_bits}-bit layer, got {tuple(t.shape)}"
            )
    if (tensors.get("phi_down") is None) != (tensors.get("phi_up") is None):
        raise PackedLayerError(f"{where}: phi_down and phi_up must come together")
    read_input_bits(tensors.get("input_bits"), where)
    if tensors.get("input_bits") is not None and tensors.get("act_clip") is None:
        raise PackedLayerError(f"{where}: tensor 'input_bits' on a layer without 'act_clip' (weight-only)")
    if act_bits is not None and tensors.get("act_clip") is None:
        raise PackedLayerError(f"{where}: act_bits={act_bits} but no 'act_clip' tensor")
    for needed, key in ((uses_rotation(input_transform), "input_signs"), (uses_smoothing(input_transform), "smooth")):
        if needed and tensors.get(key) is None:
            raise PackedLayerError(f"{where}: input_transform={input_transform!r} needs tensor '{key}'")
