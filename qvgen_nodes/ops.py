"""QVGen's custom operations for ComfyUI: the one seam between QVGen layers and ComfyUI models.

ComfyUI builds every model through an *operations* class (`comfy.ops.*`): the Wan model calls
`operations.Linear(in, out, device=, dtype=)` for each linear layer. `make_ops` returns such a
class whose `Linear` is a QVGen `PackedLinear` that ComfyUI can drive like its own layers, so
ComfyUI's model detection, `ModelPatcher` (offload, `--lowvram`, LoRA patches), `ModelSamplingSD3`,
`KSampler` and the rest keep working unchanged (the way ComfyUI-GGUF supplies its own ops).

Why this route and not ComfyUI's native quantized tensors (`QUANTIZATION.md`: `QuantizedTensor`
layouts picked by `MixedPrecisionOps` from a `_quantization_metadata` entry): that mechanism
selects layouts from a closed list (`QUANT_ALGOS` in `comfy/quant_ops.py`) and describes a layer
by a weight plus at most four static scales (`weight_scale`, `weight_scale_2`, `pre_quant_scale`,
`input_scale`). A QVGen layer needs more than that: a *real* zero point, dynamic per-token
activation quantization with learned clipping factors chosen by the current timestep, an optional
low-rank branch Φ and an input rotation. Expressing that as a tensor layout would mean
registering a third-party layout in ComfyUI's internal registry and smuggling the timestep into a
tensor subclass; and the mechanism exists only in ComfyUI releases from late 2025 on. A custom
operations class handed to `comfy.sd.load_diffusion_model_state_dict(..., model_options=
{"custom_operations": ops})` is a documented, stable argument that works on old and new releases
alike, and keeps all QVGen arithmetic in `qvgen.packed_linear.PackedLinear` and `qvgen_kernels`.

How ComfyUI's machinery meets a packed layer:
- Loading: `_load_from_state_dict` takes the packed tensors (`qweight`, `weight_scale`, …) as
  they are; a layer that the checkpoint keeps in full precision loads `weight`/`bias` normally.
  Nothing is allocated at construction, so no full-precision copy of the model ever exists.
- Devices: the packed tensors are frozen parameters, so `ModelPatcher` moves, offloads and sizes
  them like any weight. A layer whose tensors are not all on the input's device (`--lowvram` leaves
  whole layers on the offload device; ComfyUI 0.29's dynamic VRAM loader moves all but `weight` and
  `bias`) runs with temporary copies on the input's device.
- LoRA and other weight patches: `ModelPatcher` patches `<layer>.weight` through the layer's
  `convert_weight`/`set_weight` hooks (the hooks ComfyUI's scaled-fp8 ops use). `convert_weight`
  hands ComfyUI the dequantized weight; `set_weight` stores the *difference* the patches made as
  a low-rank factor pair (a dense matrix if it is not low-rank) in the layer's `weight` slot, which
  otherwise holds an empty placeholder. The forward adds `x Δᵀ` to the W4A4 product, in the
  compute dtype. Unpatching restores the placeholder, as for any ComfyUI weight. Patches ComfyUI
  applies per call (`--lowvram`'s `weight_function`, 0.29's `weight_lowvram_function`) are run on
  the dequantized weight and their difference kept the same way, cached per patch set.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvgen.config import QVGenConfig
from qvgen.packed_layer import PACKED_TENSORS, PackedLayerError
from qvgen.packed_linear import PackedLinear
from qvgen.timestep import TimestepState

PACKED_KEYS = tuple(PACKED_TENSORS)
LORA_MAX_RANK = 128  # a patch delta needing more components is kept dense
LORA_REL_TOL = 1e-3  # relative Frobenius error allowed when factoring a patch delta


@dataclass
class OpsSettings:
    """What every QVGen layer of one model shares."""

    config: QVGenConfig
    backend: str = "auto"
    timestep_state: TimestepState | None = None
    lora_max_rank: int = LORA_MAX_RANK
    layers: list[nn.Module] = field(default_factory=list)  # quantized layers, filled while loading


class LayerLoadError(ValueError):
    """A layer's tensors do not fit the ComfyUI model built for them."""


# ---- patch deltas (LoRA etc.) ----------------------------------------------------------------
def encode_delta(delta: Tensor, max_rank: int, dtype: torch.dtype) -> Tensor:
    """Store a weight difference (out, in) compactly: an empty tensor when it is zero, the low-rank
    factors `[Uᵀ | D]` of shape (r, out + in) (Δ ≈ U D) when few components carry it (a LoRA), else
    dense. The factors' relative Frobenius error is at most `LORA_REL_TOL`."""
    out_f, in_f = delta.shape
    delta = delta.float()
    total = torch.linalg.matrix_norm(delta)
    if float(total) == 0.0:
        return torch.empty(0, dtype=dtype, device=delta.device)
    n = min(out_f, in_f)
    q = min(max_rank + 8, n)
    if q >= n // 2:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        u, s, v = torch.svd_lowrank(delta, q=q, niter=4)
        vh = v.T
    # smallest rank whose residual ‖Δ − Δ_r‖_F is within tolerance (residual² = ‖Δ‖² − Σ s_i²)
    resid = (total.square() - torch.cumsum(s.square(), 0)).clamp(min=0).sqrt()
    ok = torch.nonzero(resid <= LORA_REL_TOL * total)
    r = int(ok[0]) + 1 if ok.numel() else n
    if r > max_rank or r * (out_f + in_f) >= out_f * in_f:  # factors would not be smaller: keep it dense
        return delta.to(dtype)
    root = s[:r].sqrt()
    up = u[:, :r] * root  # (out, r)
    down = root[:, None] * vh[:r]  # (r, in)
    return torch.cat([up.T, down], dim=1).to(dtype)


def decode_delta(enc: Tensor, out_features: int, in_features: int) -> Tensor | None:
    """The dense (out, in) difference an encoded delta stands for (None when empty)."""
    if enc.numel() == 0:
        return None
    if tuple(enc.shape) == (out_features, in_features):
        return enc
    up, down = enc[:, :out_features].T, enc[:, out_features:]
    return up.float() @ down.float()


def apply_delta(x: Tensor, enc: Tensor, out_features: int) -> Tensor:
    """`x Δᵀ` for an encoded delta, in x's dtype."""
    enc = enc.to(device=x.device, dtype=x.dtype)
    if tuple(enc.shape) == (out_features, x.shape[-1]):  # dense; factors are (r, out + in), never this shape
        return F.linear(x, enc)
    up, down = enc[:, :out_features].T, enc[:, out_features:]
    return F.linear(F.linear(x, down), up)


# ---- the operations class ---------------------------------------------------------------------
def make_ops(base_ops: type, settings: OpsSettings) -> type:
    """A ComfyUI operations class: `base_ops` (e.g. `comfy.ops.manual_cast`) with QVGen's `Linear`."""
    linear = make_linear_class(base_ops.Linear, settings)
    return type("QVGenOps", (base_ops,), {"Linear": linear, "qvgen_settings": settings})


def make_linear_class(base_linear: type, settings: OpsSettings) -> type:
    """`ComfyPackedLinear`: a `PackedLinear` that is also a ComfyUI linear op (`base_linear`, e.g.
    `comfy.ops.manual_cast.Linear`). It is a plain ComfyUI linear until its state dict shows packed
    tensors; then it is a QVGen layer.
    """

    class ComfyPackedLinear(PackedLinear, base_linear):  # PackedLinear first: its attributes and methods win
        qvgen_settings = settings

        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, **_kwargs):
            cfg = settings.config
            PackedLinear.__init__(  # allocate nothing: the state dict brings the tensors
                self,
                in_features,
                out_features,
                bias,
                weight_bits=cfg.weight_bits,
                act_bits=cfg.act_bits,
                n_buckets=cfg.n_buckets,
                input_transform=cfg.input_transform,
                hadamard_block_max=cfg.hadamard_block,
                allocate=False,
            )
            self.register_parameter("weight", None)
            self.quantized = False
            self.compute_dtype = dtype or torch.float32
            self.timestep_state = settings.timestep_state
            self.backend = settings.backend
            self._lowvram_delta: tuple[Any, Tensor, Any] | None = None
            self._passthrough = False  # convert/set hooks hand weights through while patch functions run

        # ---- loading ------------------------------------------------------------------------
        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
            mine = {k[len(prefix) :]: k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix) :]}
            if "qweight" in mine:
                tensors = {name: state_dict[key] for name, key in mine.items() if name in PACKED_KEYS}
                try:
                    self.load_packed(tensors, name=prefix.rstrip("."))
                except LayerLoadError as e:
                    errors.append(str(e))
                unexpected.extend(key for name, key in mine.items() if name not in PACKED_KEYS + ("weight",))
                return
            for name in ("weight", "bias"):
                if name in mine:
                    setattr(self, name, nn.Parameter(state_dict[mine[name]], requires_grad=False))
                elif name == "weight":
                    missing.append(prefix + "weight")
            unexpected.extend(key for name, key in mine.items() if name not in ("weight", "bias"))

        def load_packed(self, tensors: dict[str, Tensor], name: str = "") -> None:
            """Become a QVGen layer with these packed tensors (docs/format.md): the format's dtype rule
            with ComfyUI's storage dtype as compute dtype; no copies where the dtype already fits."""
            try:
                self.set_tensors(tensors, dtype=self.compute_dtype, name=name)
            except PackedLayerError as e:
                raise LayerLoadError(
                    f"{e} (the ComfyUI model has a {self.in_features} → {self.out_features} linear layer there)"
                ) from None
            # The `weight` slot: an empty placeholder ComfyUI can back up, patch and restore.
            dev = self.qweight.device
            self.weight = nn.Parameter(torch.empty(0, dtype=self.compute_dtype, device=dev), requires_grad=False)
            self.quantized = True
            settings.layers.append(self)

        # ---- ComfyUI patch hooks (see module docstring) -------------------------------------
        def _dequantized(self, device: torch.device) -> Tensor:
            shell = self._on_device(device) if self.qweight.device != device else self
            return PackedLinear.dequantize_weight(shell, torch.float32)

        def convert_weight(self, weight: Tensor, inplace: bool = False, **kwargs) -> Tensor:
            if not self.quantized or self._passthrough:
                return weight
            w = self._dequantized(weight.device)
            d = decode_delta(weight, self.out_features, self.in_features)
            return w if d is None else w + d.to(w.device, torch.float32)

        def set_weight(
            self, weight: Tensor, inplace_update: bool = False, seed: Any = None, return_weight: bool = False, **kwargs
        ):
            if not self.quantized or self._passthrough:
                if return_weight:
                    return weight
                self.weight = nn.Parameter(weight.to(self.weight.dtype), requires_grad=False)
                return None
            enc = encode_delta(
                weight.float() - self._dequantized(weight.device), settings.lora_max_rank, self.compute_dtype
            )
            if return_weight:
                return enc
            self.weight = nn.Parameter(enc, requires_grad=False)
            return None

        # ---- forward ------------------------------------------------------------------------
        def _on_device(self, device: torch.device) -> ComfyPackedLinear:
            """A shallow copy whose tensors all live on `device` (the original is left where it is):
            `--lowvram` leaves whole layers on the offload device, and ComfyUI's dynamic VRAM loader
            moves every tensor but `weight` and `bias`, which it expects to stream itself."""
            shell = copy.copy(self)
            shell._parameters = {
                k: (None if v is None else v.to(device, non_blocking=True)) for k, v in self._parameters.items()
            }
            return shell

        def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
            if not self.quantized:
                return base_linear.forward(self, x, *args, **kwargs)
            bias_fns = _functions(self, "bias")
            elsewhere = any(v is not None and v.device != x.device for v in self._parameters.values())
            layer = self._on_device(x.device) if (elsewhere or bias_fns) else self
            if bias_fns and layer.bias is not None:
                b = layer.bias
                for f in bias_fns:
                    b = f(b)
                layer._parameters["bias"] = b
            y = PackedLinear.forward(layer, x)
            delta = self._patch_delta(self.weight, x.device)  # the original: its identity keys the cache
            if delta is not None and delta.numel():
                y = y + apply_delta(x, delta, self.out_features)
            return y

        def _patch_delta(self, stored: Tensor | None, device: torch.device) -> Tensor | None:
            """The weight difference to add: the stored one, or the result of ComfyUI's per-call patch
            functions (`--lowvram`'s `weight_function`, dynamic VRAM's `weight_lowvram_function`).

            Those functions take the full weight and return the patched one (ComfyUI 0.29); older
            releases also call this layer's convert/set hooks from inside them. Both are served by
            handing them the dequantized weight with the hooks switched to pass-through, then
            factoring the difference. The result is reused while the patch lists are the same objects.
            """
            fns = _functions(self, "weight")
            if not fns:
                self._lowvram_delta = None  # ComfyUI dropped its per-call patches: forget their result
                return stored
            lists = [_patch_list(f) for f in fns]
            key = tuple(id(pl) for pl in lists) if all(pl is not None for pl in lists) else None
            hit = self._lowvram_delta
            if key is not None and hit is not None and hit[0] == key and hit[2] is stored:
                return hit[1]
            w = self.convert_weight(stored.to(device)) if stored is not None else self._dequantized(device)
            self._passthrough = True
            try:
                for f in fns:
                    w = f(w)
            finally:
                self._passthrough = False
            enc = encode_delta(w.float() - self._dequantized(w.device), settings.lora_max_rank, self.compute_dtype)
            self._lowvram_delta = (key, enc, stored) if key is not None else None
            return enc

        def extra_repr(self) -> str:
            if not self.quantized:
                return f"in={self.in_features}, out={self.out_features}, full precision"
            return PackedLinear.extra_repr(self) + f", backend={self.backend}"

    return ComfyPackedLinear


def _functions(layer: nn.Module, param: str) -> list:
    """ComfyUI's per-call functions for `weight`/`bias` of a layer: `<param>_function` (`--lowvram`,
    weight wrappers) and, from ComfyUI 0.29's dynamic VRAM loader, `<param>_lowvram_function`."""
    fns = list(getattr(layer, f"{param}_function", None) or [])
    extra = getattr(layer, f"{param}_lowvram_function", None)
    return fns + [extra] if extra is not None else fns


def _patch_list(f: Any) -> Any:
    """The patch list a ComfyUI `LowVramPatch` applies (its identity keys the cache), else None."""
    patches, key = getattr(f, "patches", None), getattr(f, "key", None)
    return patches.get(key) if isinstance(patches, dict) else None


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The QVGen layers of a ComfyUI model (module path → layer)."""
    return {n: m for n, m in model.named_modules() if getattr(m, "quantized", False) and isinstance(m, PackedLinear)}
