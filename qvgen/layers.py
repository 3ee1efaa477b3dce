"""The quantized linear layer in its two forms.

`QVGenLinear` is the training form: fake-quantized weight and input plus the low-rank auxiliary
branch Φ (`y = x̂ (Ŵ + L diag(m) R)ᵀ + b`). `PackedLinear` is the inference form loaded from a
checkpoint: packed integer weights, integer GEMM through `qvgen_kernels`, Φ only while rank > 0.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import convrot
from .config import QVGenConfig
from .kernels_import import qvgen_kernels
from .packed_layer import PACKED_TENSORS, PackedLayerError, assemble, check_tensors, empty_tensors, tensor_dtype
from .quantizers import SCALE_MIN, ActQuantizer, WeightQuantizer, select_clip
from .timestep import TimestepState
from .transforms import hadamard_block, random_signs, rotate, smoothing_scales, unrotate, uses_rotation, uses_smoothing


def _bucket(state: TimestepState | None) -> Tensor | int:
    return 0 if state is None else state.bucket


def layer_seed(name: str, seed: int) -> int:
    """A seed of its own for each layer's random draws, fixed by the run's seed and the layer's name."""
    digest = hashlib.blake2b(f"qvgen/{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def top_svd(mat: Tensor, rank: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`rank` singular triplets; randomized (`svd_lowrank`) for large matrices, where a full SVD
    of every layer of a 14B model would take minutes. `svd_lowrank` draws its test matrix from the
    global generator of `mat`'s device and takes no generator, so it runs on a forked one seeded
    with `seed`: the result depends on the seed alone, not on what ran before."""
    mat = mat.float()
    if min(mat.shape) <= 4 * rank + 16:
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    on_cuda = mat.device.type == "cuda"
    with torch.random.fork_rng(devices=[mat.device] if on_cuda else []):
        if on_cuda:
            with torch.cuda.device(mat.device):
                torch.cuda.manual_seed(seed)
        else:
            torch.random.default_generator.manual_seed(seed)
        u, s, v = torch.svd_lowrank(mat, q=rank + 16, niter=6)
    return u[:, :rank], s[:rank], v[:, :rank].T


def factored_svd(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-`rank` SVD of the product `a @ b` (a: out×r, b: r×in) without forming it: two QRs
    and an r×r SVD."""
    qa, ra = torch.linalg.qr(a)
    qb, rb = torch.linalg.qr(b.T)
    u, s, vh = torch.linalg.svd(ra @ rb.T)
    return qa @ u[:, :rank], s[:rank], vh[:rank] @ qb.T


class QVGenLinear(nn.Module):
    """Training form: W{b}A{b} fake quantization with a masked low-rank branch Φ."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        config: QVGenConfig,
        rank: int | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # The weight lives in the transformed input space (rotation folded in at conversion).
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scheme = config.scheme
        self.weight_quantizer: WeightQuantizer | convrot.SymmetricWeightQuantizer
        self.act_quantizer: ActQuantizer | convrot.AbsmaxActQuantizer | None
        if self.scheme == "convrot_w4a4":
            if not convrot.supports(in_features):
                raise ValueError(
                    f"{name or 'layer'}: ConvRot needs in_features divisible by {convrot.CONVROT_GROUP}, "
                    f"got {in_features}"
                )
            self.weight_quantizer = convrot.SymmetricWeightQuantizer(out_features, in_features, config.weight_bits)
            self.act_quantizer = convrot.AbsmaxActQuantizer(config.act_bits)
        else:
            self.weight_quantizer = WeightQuantizer(out_features, in_features, config.weight_bits)
            self.act_quantizer = (
                ActQuantizer(
                    config.act_bits,
                    config.n_buckets,
                    config.act_fixed_clip,
                    config.act_clip_logit_init,
                    config.zero_point_grad,
                )
                if config.act_bits is not None
                else None
            )
        r = min(config.rank if rank is None else rank, in_features, out_features)
        self.phi_down: nn.Parameter | None = None
        self.phi_up: nn.Parameter | None = None
        if r > 0:
            self.phi_down = nn.Parameter(torch.zeros(r, in_features))
            self.phi_up = nn.Parameter(torch.zeros(out_features, r))
            self.register_buffer("phi_mask", torch.ones(r))
        else:
            self.register_buffer("phi_mask", None)
        self._init_transform(config, name)
        self.seed = layer_seed(name, config.transform_seed)  # Φ's randomized SVD
        self.timestep_state: TimestepState | None = None
        # Switches to measure the weight and activation parts of the error separately.
        self.quantize_weights = True
        self.quantize_acts = True

    def _init_transform(self, config: QVGenConfig, name: str) -> None:
        # ConvRot: regular-Hadamard groups of 256, no signs, no smoothing (input_transform is "none").
        self.convrot_group = convrot.CONVROT_GROUP if self.scheme == "convrot_w4a4" else 0
        self.transform = config.input_transform
        self.rot_block = hadamard_block(self.in_features, config.hadamard_block)
        signs = random_signs(self.in_features, name, config.transform_seed) if uses_rotation(self.transform) else None
        self.register_buffer("input_signs", signs)
        log_s = torch.zeros(self.in_features) if uses_smoothing(self.transform) else None
        if log_s is not None and config.train_transform:
            self.smooth_log = nn.Parameter(log_s)
        else:
            self.register_buffer("smooth_log", log_s)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QVGenConfig, init: bool = True, name: str = "") -> QVGenLinear:
        """Wrap an existing `nn.Linear` (weights copied); `init` runs the clip search and Φ's SVD."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, config, name=name)
        layer.to(device=linear.weight.device)
        with torch.no_grad():
            w = linear.weight.float()
            if layer.input_signs is not None:
                w = rotate(w, layer.input_signs, layer.rot_block)
            if layer.convrot_group:
                w = convrot.rotate(w, layer.convrot_group)
            layer.weight.copy_(w)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.float())
        if init:
            layer.init_quantization()
        return layer

    @torch.no_grad()
    def init_quantization(self) -> None:
        """Clip search of the weight quantizer, then Φ from the remaining error."""
        self.weight_quantizer.init_from(self.effective_weight())
        self.init_phi()

    # ---- input transform ---------------------------------------------------------------------
    def smooth_scale(self) -> Tensor | None:
        return None if self.smooth_log is None else self.smooth_log.exp()

    def transform_input(self, x: Tensor) -> Tensor:
        """`x Q / s`: the rotation and smoothing the folded weight expects (identity when none).

        Computed in fp32 whatever `x`'s dtype (bf16 under autocast), with the rounding of the kernels'
        `qvgen_kernels.common.apply_transform`, so training sees the integer codes inference computes.
        """
        if self.convrot_group:
            return convrot.rotate(x, self.convrot_group)
        s = self.smooth_scale()
        if self.input_signs is None and s is None:
            return x
        v = x.float()
        if self.input_signs is not None:
            v = rotate(v, self.input_signs.float(), self.rot_block)
        return v if s is None else v / s.float()

    def effective_weight(self) -> Tensor:
        """`W Q · s`, the full-precision weight that gets quantized."""
        s = self.smooth_scale()
        return self.weight if s is None else self.weight * s

    @torch.no_grad()
    def set_smoothing(self, act_absmax: Tensor, alpha: float) -> None:
        """SmoothQuant scales from the per-channel max |input| (in the rotated space)."""
        if self.smooth_log is None:
            return
        self.smooth_log.copy_(smoothing_scales(act_absmax, self.weight, alpha).log())

    # ---- Φ -----------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """Live components of Φ (those with a non-zero mask)."""
        return 0 if self.phi_mask is None else int((self.phi_mask > 0).sum())

    @torch.no_grad()
    def quant_error(self) -> Tensor:
        w = self.effective_weight().float()
        return w - self.weight_quantizer(w)

    @torch.no_grad()
    def init_phi(self) -> None:
        """Φ from the SVD of the quantization error: L = U√S, R = √S Vᵀ (top-r components)."""
        if self.phi_down is None:
            return
        self._set_phi(*top_svd(self.quant_error(), self.phi_down.shape[0], self.seed))

    @torch.no_grad()
    def halve_phi(self, new_rank: int) -> None:
        """Phase boundary: re-SVD of the current masked product `L diag(m) R`, keep the top `new_rank`."""
        if self.phi_down is None:
            return
        if new_rank <= 0:
            self.remove_phi()
            return
        self._set_phi(*factored_svd(self.phi_up.float() * self.phi_mask, self.phi_down.float(), new_rank))

    def _set_phi(self, u: Tensor, s: Tensor, vh: Tensor) -> None:
        rank = min(s.numel(), self.phi_down.shape[0])
        root = s[:rank].clamp(min=0).sqrt()
        self.phi_up.zero_()
        self.phi_down.zero_()
        self.phi_up[:, :rank] = (u[:, :rank] * root).to(self.phi_up.dtype)
        self.phi_down[:rank] = (root[:, None] * vh[:rank]).to(self.phi_down.dtype)
        self.phi_mask.zero_()
        self.phi_mask[:rank] = 1.0

    @torch.no_grad()
    def phi_product(self) -> Tensor:
        """`L diag(m) R`, the weight-space correction Φ currently adds."""
        if self.phi_down is None:
            return torch.zeros(self.out_features, self.in_features, device=self.weight.device)
        return (self.phi_up.float() * self.phi_mask) @ self.phi_down.float()

    def remove_phi(self) -> None:
        """Rank 0: drop Φ entirely so the layer is plain W{b}A{b}."""
        self.phi_down = None
        self.phi_up = None
        self.phi_mask = None

    # ---- forward -----------------------------------------------------------------------------
    def quantize_input(self, x: Tensor) -> Tensor:
        """`x̂`, in `x`'s dtype: transform and quantize in fp32 (as the kernels do), then cast back."""
        v = self.transform_input(x)
        if self.act_quantizer is not None and self.quantize_acts:
            v = self.act_quantizer(v, _bucket(self.timestep_state))
        return v.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        x_hat = self.quantize_input(x)
        w = self.effective_weight()
        w_hat = self.weight_quantizer(w) if self.quantize_weights else w
        bias = None if self.bias is None else self.bias.to(x_hat.dtype)
        y = F.linear(x_hat, w_hat.to(x_hat.dtype), bias)
        if self.phi_down is not None:
            down = F.linear(x_hat, self.phi_down.to(x_hat.dtype)) * self.phi_mask.to(x_hat.dtype)
            y = y + F.linear(down, self.phi_up.to(x_hat.dtype))
        return y

    # ---- export ------------------------------------------------------------------------------
    @torch.no_grad()
    def export_tensors(self) -> dict[str, Tensor]:
        """The packed-format tensors of this layer (see docs/format.md)."""
        if self.convrot_group:
            return self.convrot_tensors()
        wq = self.weight_quantizer
        r = self.rank
        return assemble(
            wq.int_codes(self.effective_weight()),
            wq.scale.detach().float().clamp(min=SCALE_MIN),
            wq.zero.detach(),
            wq.bits,
            act_clip=None if self.act_quantizer is None else self.act_quantizer.clip_factors(),
            bias=self.bias,
            input_signs=self.input_signs,
            smooth=None if self.smooth_log is None else self.smooth_log.detach().exp(),
            phi_down=self.phi_down[:r] if r > 0 else None,
            phi_up=(self.phi_up[:, :r] * self.phi_mask[:r]) if r > 0 else None,
        )

    @torch.no_grad()
    def convrot_tensors(self) -> dict[str, Tensor]:
        """ComfyUI's `convrot_w4a4` tensors: packed int4 `weight` (int8, out × K/2), `weight_scale`, `bias`.

        Φ cannot be expressed in that format, so it must have decayed to rank 0.
        """
        if self.rank > 0:
            raise ValueError(
                f"layer has Φ rank {self.rank}; ComfyUI's convrot_w4a4 format has no low-rank branch "
                "(train until the rank decay reaches 0)"
            )
        wq = self.weight_quantizer
        out = {
            "weight_scale": wq.export_scale(),
            "weight": convrot.pack_int4(wq.int_codes(self.weight)),
        }
        if self.bias is not None:
            out["bias"] = self.bias.detach().float().clone()
        return out

    def extra_repr(self) -> str:
        a = self.act_quantizer.bits if self.act_quantizer is not None else 16
        kind = ", convrot" if self.convrot_group else ""
        return (
            f"in={self.in_features}, out={self.out_features}, W{self.weight_quantizer.bits}A{a}{kind}, rank={self.rank}"
        )


class ConvRotLinear(nn.Module):
    """Inference form of a ComfyUI `convrot_w4a4` layer (same tensor names as ComfyUI's checkpoint).

    Runs `convrot.convrot_linear` in PyTorch; ComfyUI itself runs the same file with
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
        if not convrot.supports(in_features):
            raise ValueError(f"ConvRot needs in_features divisible by {convrot.CONVROT_GROUP}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.act_bits = act_bits
        self.group = convrot.CONVROT_GROUP
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
        return convrot.convrot_linear(
            x, self.weight, self.weight_scale, self.bias, act_bits=self.act_bits, group=self.group
        )

    @torch.no_grad()
    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """`s_w q_w` rotated back to the original input space (for LoRA patching and debugging)."""
        w = convrot.unpack_int4(self.weight).float() * self.weight_scale.float()[:, None]
        return convrot.rotate(w, self.group).to(dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, W4A{self.act_bits}, convrot_w4a4"


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
            allocate=False,
        )
        layer.set_tensors(tensors, dtype=dtype, name=name)
        return layer

    def set_tensors(self, tensors: dict[str, Tensor], *, dtype: torch.dtype | None = None, name: str = "") -> None:
        """Check and take a layer's packed tensors, without a copy where the dtype already fits.

        `dtype`: the compute dtype, which bias and Φ are cast to (None keeps them as given); the
        other tensors must already have the dtype the format fixes (scales stay float32).
        """
        check_tensors(
            tensors,
            self.in_features,
            self.out_features,
            weight_bits=self.weight_bits,
            act_bits=self.act_bits,
            input_transform=self.transform,
            where=f"layer '{name}'" if name else "layer",
        )
        for key in PACKED_TENSORS:
            t = tensors.get(key)
            if t is not None and dtype is not None:
                t = t.to(tensor_dtype(key, dtype))
            self.register_parameter(key, None if t is None else nn.Parameter(t, requires_grad=False))

    @property
    def rank(self) -> int:
        return 0 if self.phi_down is None else self.phi_down.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        # the input transform (rotation, smoothing) runs inside the kernels' activation quantization
        lo: Tensor | float = 1.0
        hi: Tensor | float = 1.0
        if self.act_bits is not None:
            lo, hi = select_clip(self.act_clip.float(), _bucket(self.timestep_state), x)
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
        return f"in={self.in_features}, out={self.out_features}, W{self.weight_bits}A{a}, rank={self.rank}"
