"""The inference form of a QVGen layer: packed integer weights, integer GEMM through `qvgen_kernels`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .kernels_import import qvgen_kernels
from .packed_layer import (
    PACKED_TENSORS,
    PackedLayerError,
    check_tensors,
    empty_tensors,
    input_bits_tensor,
    read_input_bits,
    tensor_dtype,
)
from .quantizers import act_group_length, select_clip
from .timestep import TimestepState, bucket_of
from .transforms import hadamard_block, unrotate

if TYPE_CHECKING:
    from .config import QVGenConfig


class PackedLinear(nn.Module):
    """Inference form: packed integer weights; runs the integer arithmetic via `qvgen_kernels`.

    Its tensors are those of `qvgen.packed_layer.PACKED_TENSORS`, frozen parameters rather than
    buffers (diffusers and ComfyUI look at parameters for device placement, offload and a module's
    dtype). `set_tensors` is the one place they are put in; `allocate=False` builds an empty layer
    for it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight_bits: int = 4,
        act_bits: int | None = 4,
        n_buckets: int = 1,
        rank: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        input_transform: str = "none",
        hadamard_block_max: int = 256,
        act_group_size: int | None = None,
        *,
        allocate: bool = True,
    ) -> None:
        # nn.Module's own __init__, not super(): as a ComfyUI op (qvgen_nodes/ops.py) the next base
        # class is an nn.Linear, whose __init__ would allocate a full-precision weight.
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight_bits, self.act_bits = weight_bits, act_bits
        self.transform = input_transform
        self.rot_block = hadamard_block(in_features, hadamard_block_max)
        self.act_group = act_group_length(in_features, act_group_size)  # 0: per-token activation scales
        self.timestep_state: TimestepState | None = None
        self.backend = "auto"
        for key in PACKED_TENSORS:
            self.register_parameter(key, None)
        if allocate:
            shells = empty_tensors(
                in_features,
                out_features,
                bias=bias,
                weight_bits=weight_bits,
                act_bits=act_bits,
                n_buckets=n_buckets,
                rank=rank,
                input_transform=input_transform,
                dtype=dtype,
                device=device,
            )
            self.set_tensors(shells)

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, Tensor],
        config: QVGenConfig,
        in_features: int,
        *,
        dtype: torch.dtype | None = None,
        name: str = "",
    ) -> PackedLinear:
        """A layer holding `tensors` (see `set_tensors`) with the settings of `config`."""
        q = tensors.get("qweight")
        if q is None:
            raise PackedLayerError(f"{name or 'layer'}: tensor 'qweight' missing")
        layer = cls(
            in_features,
            q.shape[0],
            tensors.get("bias") is not None,
            weight_bits=config.weight_bits,
            act_bits=config.act_bits,
            input_transform=config.input_transform,
            hadamard_block_max=config.hadamard_block,
            act_group_size=config.act_group_size,
            allocate=False,
        )
        layer.set_tensors(tensors, dtype=dtype, name=name)
        return layer

    def set_tensors(self, tensors: dict[str, Tensor], *, dtype: torch.dtype | None = None, name: str = "") -> None:
        """Check and take a layer's packed tensors, without a copy where the dtype already fits.

        `dtype`: the compute dtype, which bias and Φ are cast to (None keeps them as given); the
        other tensors must already have the dtype the format fixes (scales stay float32). An
        `input_bits` tensor gives the layer its own activation width (per-layer mixed precision).
        """
        where = f"layer '{name}'" if name else "layer"
        bits = read_input_bits(tensors.get("input_bits"), where)
        if bits is not None:
            self.act_bits = bits
        check_tensors(
            tensors,
            self.in_features,
            self.out_features,
            weight_bits=self.weight_bits,
            act_bits=self.act_bits,
            input_transform=self.transform,
            where=where,
        )
        for key in PACKED_TENSORS:
            t = tensors.get(key)
            if t is not None and dtype is not None:
                t = t.to(tensor_dtype(key, dtype))
            self.register_parameter(key, None if t is None else nn.Parameter(t, requires_grad=False))

    def set_input_bits(self, bits: int) -> None:
        """Quantize this layer's inputs to `bits` instead of the model's width, recorded in its
        `input_bits` tensor so the file says it (per-layer mixed precision, `layer_act_bits`)."""
        device = self.qweight.device if self.qweight is not None else None
        self.act_bits = bits
        self.register_parameter("input_bits", nn.Parameter(input_bits_tensor(bits, device), requires_grad=False))

    @property
    def rank(self) -> int:
        return 0 if self.phi_down is None else self.phi_down.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        # the input transform (rotation, smoothing) runs inside the kernels' activation quantization
        lo: Tensor | float = 1.0
        hi: Tensor | float = 1.0
        if self.act_bits is not None:
            lo, hi = select_clip(self.act_clip.float(), bucket_of(self.timestep_state), x)
            lo, hi = lo.squeeze(-1), hi.squeeze(-1)
        bias = self.bias
        backend = qvgen_kernels.resolve_backend(self.backend, x.device)
        return qvgen_kernels.quantized_linear(
            x,
            self._weight_codes(backend),
            self.weight_scale.float(),
            self.weight_zero.float(),
            self.weight_qsum,
            bias,
            in_features=self.in_features,
            w_bits=self.weight_bits,
            a_bits=self.act_bits,
            clip_lo=lo,
            clip_hi=hi,
            phi_down=self.phi_down,
            phi_up=self.phi_up,
            out_dtype=x.dtype,
            input_signs=self.input_signs,
            rot_block=self.rot_block if self.input_signs is not None else 0,
            smooth=self.smooth,
            act_group=self.act_group,
            backend=backend,
        )

    def _weight_codes(self, backend: str) -> Tensor:
        """`qweight`, or on the CPU path its codes unpacked to one byte each, kept between calls.

        Unpacking 4-bit weights on every call dominated a CPU forward; the cache costs one byte per
        weight (twice the packed size) per layer, is not a parameter (never saved or moved) and is
        rebuilt when `qweight` is replaced or changed. GPU paths unpack in registers: no cache.
        """
        q = self.qweight
        if backend != "cpu" or q.device.type != "cpu" or self.weight_bits > 4 or q.shape[1] == self.in_features:
            return q
        if torch.compiler.is_compiling():  # a compiled graph unpacks inline (the cache's checks would break it)
            return qvgen_kernels.unpack_weight(q, self.weight_bits, self.in_features)
        # inference tensors (ComfyUI loads under torch.inference_mode) have no version counter; they
        # cannot be changed in place outside inference mode, and ComfyUI swaps weights for new tensors
        key = (q.data_ptr(), None if q.is_inference() else q._version, q.shape)
        cache = self.__dict__.get("_codes")
        if cache is None or cache[0] != key:
            cache = (key, qvgen_kernels.unpack_weight(q, self.weight_bits, self.in_features))
            self.__dict__["_codes"] = cache
        return cache[1]

    def cached_codes_bytes(self) -> int:
        """Memory held by the CPU path's unpacked weight codes (0 when none are cached)."""
        cache = self.__dict__.get("_codes")
        return 0 if cache is None else cache[1].numel()

    @torch.no_grad()
    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """`s_w (q_w - z_w)` (plus Φ's product folded in), for LoRA patching and debugging."""
        q = qvgen_kernels.unpack_weight(self.qweight, self.weight_bits, self.in_features).float()
        w = self.weight_scale[:, None] * (q - self.weight_zero[:, None])
        if self.phi_down is not None:
            w = w + self.phi_up.float() @ self.phi_down.float()
        if self.smooth is not None:  # back to the original input space
            w = w / self.smooth.float()
        if self.input_signs is not None:
            w = unrotate(w, self.input_signs.float(), self.rot_block)
        return w.to(dtype)

    def extra_repr(self) -> str:
        a = self.act_bits if self.act_bits is not None else 16
        groups = f" (groups of {self.act_group})" if self.act_group and self.act_bits is not None else ""
        return f"in={self.in_features}, out={self.out_features}, W{self.weight_bits}A{a}{groups}, rank={self.rank}"
