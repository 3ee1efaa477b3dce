"""comfy-kitchen's kernels for the ComfyUI-native inference layers, where the GPU has them.

comfy-kitchen (ComfyUI's kernel library) runs its layouts outside ComfyUI: a layer's stored tensors
wrapped in a `QuantizedTensor` of the format's layout class, then `torch.nn.functional.linear(x, qt, bias)`
dispatches to the best backend that can take the call (cuda, triton, hip, else eager). Its eager
backend computes what our PyTorch layers compute (tests/test_diffusers_native.py checks each format),
so it brings nothing on the CPU; on a GPU its cuda/triton kernels are the fast path ComfyUI itself uses.

The one seam: `use_comfy_kitchen(model)` gives each native layer (`ConvRotLinear`, `NVFP4Linear`,
`SVDQuantLinear`, `W4A8Linear`) a subclass whose forward asks `gpu_backend(x.device, layer)`: a
backend name routes the call to comfy-kitchen, None keeps the layer's own dequantized compute. The
loaders call it (`load_comfy_native`, the diffusers door); the core layers know nothing of it.
Not checked here on a GPU (this project's CI has none): docs/comfyui.md says what is and is not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from ...schemes.convrot import ConvRotLinear
from ...schemes.nvfp4 import NVFP4Linear
from ...schemes.svdquant import SVDQuantLinear
from ...schemes.w4a8 import W4A8Linear

GPU_BACKENDS = ("cuda", "triton", "hip")  # comfy-kitchen's backends with GPU kernels; "eager" is plain PyTorch
NVFP4_LAYOUT = "TensorCoreNVFP4Layout"
CONVROT_GROUP_QUANT = 64  # what ComfyUI passes as `quant_group_size` for convrot_w4a4 (comfy/ops.py)


def kitchen() -> ModuleType | None:
    """comfy_kitchen when installed (imported on first use), else None."""
    try:
        import comfy_kitchen
    except ImportError:
        return None
    return comfy_kitchen


def gpu_backend(device: torch.device, layer: nn.Module) -> str | None:
    """The comfy-kitchen GPU backend to run `layer` on an input on `device`, None for our own compute.

    Only inputs on a CUDA/ROCm device, and only backends comfy-kitchen reports available. ConvRot
    layers flagged `linear_dtype: "int8"` need its cuda backend: the others quantize tokens to int4.
    """
    ck = kitchen() if device.type == "cuda" else None
    if ck is None:
        return None
    allowed = ("cuda",) if isinstance(layer, ConvRotLinear) and layer.act_bits == 8 else GPU_BACKENDS
    return next((b for b in allowed if ck.registry.is_available(b)), None)


# ---- each format's layout tensor, as ComfyUI's loader builds it (comfy/ops.py) ---------------------------
def _convrot(layer: ConvRotLinear, dtype: torch.dtype) -> tuple[Tensor, str, Any]:
    from comfy_kitchen.tensor import TensorCoreConvRotW4A4Layout as L

    params = L.Params(
        scale=layer.weight_scale,
        orig_dtype=dtype,
        orig_shape=(layer.out_features, layer.in_features),
        convrot_groupsize=layer.group,
        quant_group_size=CONVROT_GROUP_QUANT,
        linear_dtype="int8" if layer.act_bits == 8 else "int4",
    )
    return layer.weight, "TensorCoreConvRotW4A4Layout", params


def _nvfp4(layer: NVFP4Linear, dtype: torch.dtype) -> tuple[Tensor, str, Any]:
    from comfy_kitchen.tensor import TensorCoreNVFP4Layout as L

    shape = (layer.weight.shape[0], layer.in_features)  # rows as stored (padded to 16)
    params = L.Params(scale=layer.weight_scale_2, orig_dtype=dtype, orig_shape=shape, block_scale=layer.weight_scale)
    return layer.weight, NVFP4_LAYOUT, params


def _svdquant(layer: SVDQuantLinear, dtype: torch.dtype) -> tuple[Tensor, str, Any]:
    from comfy_kitchen.tensor import TensorCoreSVDQuantW4A4Layout as L

    params = L.Params(
        scale=layer.weight_scale.to(dtype),
        proj_down=layer.weight_proj_down.to(dtype),
        proj_up=layer.weight_proj_up.to(dtype),
        smooth_factor=layer.weight_smooth_factor.to(dtype),
        act_unsigned=False,
        orig_dtype=dtype,
        orig_shape=(layer.out_features, layer.in_features),
    )
    return layer.weight, "TensorCoreSVDQuantW4A4Layout", params


def _w4a8(layer: W4A8Linear, dtype: torch.dtype) -> tuple[Tensor, str, Any]:
    from comfy_kitchen.tensor import AsymW4A8Int8Layout as L

    params = L.Params(
        scale=layer.weight_s_rel.view(torch.float8_e4m3fn),
        s_channel=layer.weight_s_channel,
        codebook=layer.weight_codebook,
        group_size=layer.group,
        convrot_groupsize=layer.convrot_group,
        orig_dtype=dtype,
        orig_shape=(layer.out_features, layer.in_features),
    )
    return layer.weight, "AsymW4A8Int8Layout", params


LAYOUTS: dict[type[nn.Module], Callable[[Any, torch.dtype], tuple[Tensor, str, Any]]] = {
    ConvRotLinear: _convrot,
    NVFP4Linear: _nvfp4,
    SVDQuantLinear: _svdquant,
    W4A8Linear: _w4a8,
}


def weight_tensor(layer: nn.Module, dtype: torch.dtype) -> Any:
    """The layer's weight as comfy-kitchen's `QuantizedTensor` of its format's layout (computing in `dtype`)."""
    from comfy_kitchen.tensor import QuantizedTensor

    for cls, build in LAYOUTS.items():
        if isinstance(layer, cls):
            return QuantizedTensor(*build(layer, dtype))
    raise TypeError(f"{type(layer).__name__} is not a ComfyUI-native layer; expected one of {list(LAYOUTS)}")


def kitchen_linear(layer: nn.Module, x: Tensor, backend: str | None = None) -> Tensor:
    """`layer(x)` through comfy-kitchen (`backend`: the one to ask for first; None lets it choose)."""
    from comfy_kitchen.tensor import QuantizedTensor

    ck = kitchen()
    weight = weight_tensor(layer, x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    if isinstance(layer, NVFP4Linear) and layer.quantize_input:  # ComfyUI quantizes NVFP4 inputs itself
        x2 = QuantizedTensor.from_float(x2, NVFP4_LAYOUT, scale=layer.input_scale)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    padded = layer.weight.shape[0] != layer.out_features  # NVFP4 stores rows padded to 16; bias has the real ones
    with ck.registry.use_backend(backend) if backend else contextlib.nullcontext():
        y = torch.nn.functional.linear(x2, weight, None if padded else bias)
    if padded:
        y = y[:, : layer.out_features] + (0 if bias is None else bias)
    return y.reshape(*x.shape[:-1], layer.out_features)


class KitchenRoute(nn.Module):
    """Mixin of the routed layer classes: comfy-kitchen where `gpu_backend` names a backend, else the
    layer's own forward."""

    def forward(self, x: Tensor) -> Tensor:
        backend = gpu_backend(x.device, self)
        if backend is None:
            return super().forward(x)
        return kitchen_linear(self, x, backend)


_ROUTED: dict[type[nn.Module], type[nn.Module]] = {}


def routed_class(cls: type[nn.Module]) -> type[nn.Module]:
    """`cls` with `KitchenRoute` in front (same name, same tensors; one class per layer class)."""
    if cls not in _ROUTED:
        _ROUTED[cls] = type(cls.__name__, (KitchenRoute, cls), {"__doc__": cls.__doc__, "__module__": __name__})
    return _ROUTED[cls]


def use_comfy_kitchen(model: nn.Module) -> int:
    """Route every ComfyUI-native layer of `model` through `KitchenRoute` (in place); returns how many."""
    n = 0
    for module in model.modules():
        if isinstance(module, tuple(LAYOUTS)) and not isinstance(module, KitchenRoute):
            module.__class__ = routed_class(type(module))
            n += 1
    return n
