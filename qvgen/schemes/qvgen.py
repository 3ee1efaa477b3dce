"""The paper's scheme: asymmetric per-channel int weights, per-token int activations with learned
per-timestep clipping, optional rotation/smoothing; shipped as a packed QVGen checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..packed_layer import assemble
from ..packed_linear import PackedLinear
from ..quantizers import SCALE_MIN, ActQuantizer, WeightQuantizer, act_group_length
from .base import Scheme

if TYPE_CHECKING:
    from ..config import QVGenConfig


def quantizers(out_features: int, in_features: int, config: QVGenConfig) -> tuple[nn.Module, nn.Module | None]:
    wq = WeightQuantizer(out_features, in_features, config.weight_bits)
    if config.act_bits is None:
        return wq, None
    aq = ActQuantizer(
        config.act_bits,
        config.n_buckets,
        config.act_fixed_clip,
        config.act_clip_logit_init,
        config.zero_point_grad,
        group=act_group_length(in_features, config.act_group_size),
    )
    return wq, aq


@torch.no_grad()
def export(layer: Any) -> dict[str, Tensor]:
    """The packed-format tensors of a trained `QVGenLinear` (see docs/format.md)."""
    if layer.smooth_buckets > 1 or layer.rot_skew is not None:
        raise NotImplementedError(
            "smooth_buckets / learned_rotation: training-only experiments, the packed format (v4) has no "
            "per-bucket weights or learned rotation; see README, 'Timestep-dependent smoothing and learned rotations'"
        )
    wq, r = layer.weight_quantizer, layer.rank
    return assemble(
        wq.int_codes(layer.effective_weight()),
        wq.scale.detach().float().clamp(min=SCALE_MIN),
        wq.zero.detach(),
        wq.bits,
        act_clip=None if layer.act_quantizer is None else layer.act_quantizer.clip_factors(),
        bias=layer.bias,
        input_signs=layer.input_signs,
        smooth=None if layer.smooth_log is None else layer.smooth_log.detach().exp(),
        phi_down=layer.phi_down[:r] if r > 0 else None,
        phi_up=(layer.phi_up[:, :r] * layer.phi_mask[:r]) if r > 0 else None,
        input_bits=layer.own_act_bits,
    )


def shell(
    linear: nn.Module, config: QVGenConfig, rank: int, dtype: torch.dtype, device: torch.device | str
) -> PackedLinear:
    return PackedLinear(
        linear.in_features,
        linear.out_features,
        linear.bias is not None,
        weight_bits=config.weight_bits,
        act_bits=config.act_bits,
        n_buckets=config.n_buckets,
        rank=rank,
        dtype=dtype,
        device=device,
        input_transform=config.input_transform,
        hadamard_block_max=config.hadamard_block,
        act_group_size=config.act_group_size,
    )


def pack(layer: Any, config: QVGenConfig, dtype: torch.dtype, name: str) -> PackedLinear:
    return PackedLinear.from_tensors(export(layer), config, layer.in_features, dtype=dtype, name=name)


def check(config: QVGenConfig) -> str | None:
    return None  # every QVGenConfig field applies to this scheme (validated in QVGenConfig itself)


def unsupported(in_features: int) -> str | None:
    return None


SCHEME = Scheme(
    name="qvgen",
    file_format="qvgen",
    check=check,
    unsupported=unsupported,
    quantizers=quantizers,
    rotate=None,
    export=export,
    shell=shell,
    pack=pack,
    inference_types=(PackedLinear,),
    act_groups=True,
    layer_act_bits=True,
    learned_transforms=True,
)
