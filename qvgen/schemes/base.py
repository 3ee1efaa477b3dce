"""What a quantization scheme decides for a layer, as one record the rest of the code asks.

`QVGenLinear`, model surgery and the checkpoint writers never branch on a scheme's name: they
look its `Scheme` up (`qvgen.schemes.get_scheme`) and call it. A new scheme is one module in this
package that builds a `Scheme` and is listed in `qvgen/schemes/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..config import QVGenConfig

# file formats a scheme exports to: QVGen's packed checkpoint (docs/format.md) or ComfyUI's native single file
FILE_FORMATS = ("qvgen", "comfy")


@dataclass(frozen=True)
class Scheme:
    """The arithmetic of one quantization scheme, for training, packing and export.

    - `check(config)`: why the config cannot use the scheme (None when it can);
    - `unsupported(in_features)`: why a linear layer cannot be quantized (it then stays in full precision);
    - `quantizers(out_features, in_features, config)`: the weight and activation fake quantizers;
    - `rotate`: a fixed input rotation folded into the stored weight (None when the scheme has none);
    - `export(layer)`: a trained `QVGenLinear`'s tensors in the scheme's file format;
    - `shell(linear, config, rank, dtype, device)`: an empty inference layer shaped like `linear`;
    - `pack(layer, config, dtype, name)`: the inference layer of a trained `QVGenLinear`;
    - `inference_types`: the classes `shell`/`pack` build;
    - `phi_sees_input`: Φ is applied to the transformed but unquantized input (SVDQuant's low-rank
      branch) instead of to `x̂` (the paper's Φ).

    How a "comfy" scheme's layers are written to and read from ComfyUI's file is the adapter's
    (`qvgen.adapters.comfy.native.LAYER_FORMATS`), not the scheme's.
    """

    name: str
    file_format: str
    check: Callable[[QVGenConfig], str | None]
    unsupported: Callable[[int], str | None]
    quantizers: Callable[[int, int, QVGenConfig], tuple[nn.Module, nn.Module | None]]
    rotate: Callable[[Tensor], Tensor] | None
    export: Callable[[Any], dict[str, Tensor]]
    shell: Callable[[nn.Module, QVGenConfig, int, torch.dtype, torch.device | str], nn.Module]
    pack: Callable[[Any, QVGenConfig, torch.dtype, str], nn.Module]
    inference_types: tuple[type[nn.Module], ...]
    phi_sees_input: bool = False
    act_groups: bool = False  # honours `act_group_size` (activation scales per group of K instead of per token)
    layer_act_bits: bool = False  # honours `layer_act_bits` (an activation width per layer)
    learned_transforms: bool = False  # trains `smooth_buckets` / `learned_rotation` (QVGenConfig)

    def __post_init__(self) -> None:
        if self.file_format not in FILE_FORMATS:
            raise ValueError(f"scheme {self.name!r}: file_format {self.file_format!r} is not one of {FILE_FORMATS}")


def fixed_arithmetic(
    config: QVGenConfig,
    scheme: str,
    *,
    weight_bits: str,
    act_bits: dict[int, str],
    input_transform: str,
    transform_note: str,
    low_rank_branch: bool = False,
) -> str | None:
    """Why `config` does not fit a format whose arithmetic is fixed (None when it does).

    `weight_bits` says what 4-bit weights the format stores; `act_bits` maps each allowed token
    width to what it means; `input_transform` is the one transform the format can express, with
    `transform_note` saying why; without a `low_rank_branch`, Φ must decay to rank 0.
    """
    if config.weight_bits != 4:
        return f"weight_bits: scheme {scheme!r} stores {weight_bits}, got {config.weight_bits!r}"
    if config.act_bits not in act_bits:
        allowed = " or ".join(f"{what} ({bits})" for bits, what in act_bits.items())
        return f"act_bits: scheme {scheme!r} quantizes inputs to {allowed}, got {config.act_bits!r}"
    if config.input_transform != input_transform:
        return (
            f"input_transform: scheme {scheme!r} {transform_note}; expected {input_transform!r}, "
            f"got {config.input_transform!r}"
        )
    if config.final_rank and not low_rank_branch:
        return f"final_rank: scheme {scheme!r} has no low-rank branch, Φ must decay to 0; got {config.final_rank!r}"
    return None


def pack_via_state_dict(
    shell: Callable[[nn.Module, QVGenConfig, int, torch.dtype, torch.device | str], nn.Module],
    export: Callable[[Any], dict[str, Tensor]],
    *,
    keeps_rank: bool = False,
) -> Callable[[Any, QVGenConfig, torch.dtype, str], nn.Module]:
    """`Scheme.pack` for schemes whose inference layer takes the exported tensors as its state dict
    (each cast to the dtype the layer holds it in); `keeps_rank`: the layer keeps Φ at its rank."""

    def pack(layer: Any, config: QVGenConfig, dtype: torch.dtype, name: str) -> nn.Module:
        out = shell(layer, config, layer.rank if keeps_rank else 0, dtype, layer.weight.device)
        out.load_state_dict({k: v.to(getattr(out, k).dtype) for k, v in export(layer).items()})
        return out

    return pack
