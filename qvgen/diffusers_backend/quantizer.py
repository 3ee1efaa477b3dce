"""`QVGenQuantizer`: the diffusers quantizer for `quant_method: "qvgen"`.

Diffusers' own `from_pretrained` does the loading; this class only shapes the model around it:

- a QVGen checkpoint (`config.json` has a `quantization_config`): before the weights are read,
  the model skeleton, still on the `meta` device, gets empty `PackedLinear` shells
  (`qvgen.build_packed_model`); the checkpoint's tensors carry exactly the shells' parameter
  names, so diffusers' loader fills them. No full-precision copy of the weights is ever made.
  The quantized layers' tensors are taken from the checkpoint as stored (`create_quantized_param`),
  so the float32 scales and zero points survive a `torch_dtype=torch.bfloat16` load.
- a full-precision checkpoint with `quantization_config=QVGenConfig(...)`: the weights load as
  usual, then each linear layer is quantized in turn (round-to-nearest with the clip search of
  QVGen's weight quantizer; no training, so quality is well below a QAT checkpoint).

`save_pretrained` of either writes the QVGen checkpoint format (docs/format.md) unchanged: the
model's state dict *is* the format.

The schemes shipped in ComfyUI's native format (`convrot_w4a4`, `nvfp4`, `svdquant_w4a4`,
`w4a8_int8`) take the same route with their own inference layers: the scheme's registry record
(`Scheme.shell`, `Scheme.inference_types`) builds the shells, and a tensor keeps its stored dtype
when the layer says so (integer codes, fp8 scales, its `keep_dtype`). Their diffusers folder is
`qvgen.save_quantized(model, config, folder)`; `from_single_file` reads ComfyUI's file itself
(`maybe_update_state_dict`: the file's `comfy_quant` entries are checked, then dropped).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from torch import nn

from ..checkpoint import CheckpointError, validate_state_dict
from ..config import QVGenConfig
from ..layers import QVGenLinear
from ..packed_layer import PACKED_TENSORS, PackedLayerError, check_codes, quantize_linear
from ..packed_linear import PackedLinear
from ..schemes import get_scheme
from ..surgery import build_packed_model, timestep_state, unsupported_reason
from .config import QVGenQuantizationConfig

logger = logging.getLogger("qvgen.diffusers")

MIN_DIFFUSERS_VERSION = "0.33.1"  # oldest release tested (with transformers 4.51); Wan arrived in 0.33
PTQ_WARNING = (
    "QVGen: quantizing a full-precision model on load with round-to-nearest W%sA%s (no training). "
    "Expect a clear quality loss at 4 bits; QVGen QAT checkpoints (python -m qvgen.train) are much better."
)


class QVGenQuantizer(DiffusersQuantizer):
    """Builds QVGen's packed layers for `from_pretrained`; see the module docstring."""

    requires_calibration = False
    required_packages = ["qvgen", "accelerate"]
    use_keep_in_fp32_modules = True

    def __init__(self, quantization_config: QVGenConfig | QVGenQuantizationConfig | dict, **kwargs: Any) -> None:
        super().__init__(QVGenQuantizationConfig.from_qvgen_config(quantization_config), **kwargs)
        self.compute_dtype: torch.dtype | None = None
        self.keep_in_fp32_modules: list[str] = []
        self.source = ""  # the checkpoint file(s) when diffusers tells us, else the model class
        self.files: list[Path] = []  # the checkpoint's safetensors files (diffusers >= 0.39 passes them)
        self.loaded_keys: list[str] = []  # the checkpoint's tensor names (diffusers >= 0.39 passes them)
        self.scheme = get_scheme(self.quantization_config.scheme)
        self.layer_types: tuple[type[nn.Module], ...] = self.scheme.inference_types

    # ---- environment and dtype -------------------------------------------------------------
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        import diffusers
        from packaging import version

        if version.parse(diffusers.__version__).release < version.parse(MIN_DIFFUSERS_VERSION).release:
            raise ImportError(
                f"QVGen needs diffusers>={MIN_DIFFUSERS_VERSION} (found {diffusers.__version__}): "
                f"pip install -U 'diffusers>={MIN_DIFFUSERS_VERSION}'"
            )
        try:
            import accelerate  # noqa: F401  (diffusers builds the skeleton on `meta` with it)
        except ImportError:
            raise ImportError("Loading QVGen models needs accelerate: pip install accelerate") from None
        if kwargs.get("from_flax"):
            raise ValueError("QVGen checkpoints are safetensors only; from_flax=True is not supported")

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype | None:
        self.compute_dtype = torch_dtype
        return torch_dtype

    # ---- before the weights are read ---------------------------------------------------------
    def _process_model_before_weight_loading(
        self, model: nn.Module, device_map: Any = None, keep_in_fp32_modules: list[str] | None = None, **kwargs: Any
    ) -> nn.Module:
        self.keep_in_fp32_modules = [m for m in (keep_in_fp32_modules or []) if m is not None]
        self.source = self.source or f"QVGen checkpoint of {type(model).__name__}"
        if not self.pre_quantized and self.scheme.file_format != "qvgen":
            raise ValueError(
                f"quantization_config: scheme {self.scheme.name!r} cannot quantize a full-precision model on load "
                f"(its scales come from training and calibration); train it with python -m qvgen.train --scheme "
                f"{self.scheme.name} and load the exported folder, or quantize on load with scheme 'qvgen'"
            )
        if self.pre_quantized:
            config = self.quantization_config.to_qvgen_config()
            build_packed_model(model, config, dtype=self.compute_dtype or torch.float32, device="meta")
            if kwargs.get("state_dict") is not None:  # from_single_file hands over the whole (renamed) file
                keys = set(kwargs["state_dict"])
                self._check_layer_keys(model, keys, [k for k in model.state_dict() if k not in keys])
        return model

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        """diffusers ≥ 0.39 passes the resolved files here: validate every quantized layer from the
        safetensors headers (no tensor data read), so errors name the file. Older diffusers skip
        this hook and the per-tensor checks in `create_quantized_param` still apply."""
        self.loaded_keys = list(loaded_keys)
        if self.pre_quantized and checkpoint_files:
            files = [Path(f) for f in checkpoint_files if isinstance(f, (str, Path))]
            pickles = [f for f in files if f.suffix != ".safetensors"]
            if pickles:  # diffusers falls back to .bin when a folder has no safetensors (docs/format.md)
                raise CheckpointError(
                    f"{pickles[0]}: QVGen checkpoints are safetensors only; refusing a pickle-based weights file "
                    "(pass use_safetensors=True to from_pretrained to have diffusers refuse it before reading)"
                )
            if files:
                self.files = files
                self.source = str(files[0] if len(files) == 1 else files[0].parent)
                if self.scheme.file_format == "qvgen":  # native layers are checked tensor by tensor on load
                    validate_state_dict(_header_tensors(files), self.quantization_config.to_qvgen_config(), self.source)
        return loaded_keys

    def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """`from_single_file` of ComfyUI's native file: check each layer's `comfy_quant` entry against the
        config's scheme, then drop the entries; diffusers' Wan mapping renames the rest."""
        if not self.pre_quantized or self.scheme.file_format != "comfy":
            return state_dict
        from ..adapters.comfy.native import ComfyNativeError, strip_layer_confs

        try:
            return strip_layer_confs(state_dict, self.scheme.name, "single file")
        except ComfyNativeError as e:
            raise CheckpointError(str(e)) from None

    def update_missing_keys(self, model: nn.Module, missing_keys: list[str], prefix: str) -> list[str]:
        if self.pre_quantized:
            self._check_layer_keys(model, self.loaded_keys, missing_keys)
        return missing_keys

    def _check_layer_keys(self, model: nn.Module, loaded: Iterable[str], missing: Iterable[str]) -> None:
        """Fail on a quantized layer's tensor the checkpoint lacks, or holds but the layer has no place for
        (a variant this loader does not run, e.g. W4A8's `weight_correction`: diffusers would only warn)."""
        packed = {n for n, m in model.named_modules() if isinstance(m, self.layer_types)}
        lost = sorted(k for k in missing if k.rpartition(".")[0] in packed)
        if lost:
            more = f" (and {len(lost) - 5} more)" if len(lost) > 5 else ""
            raise CheckpointError(
                f"{self.source}: missing tensors of quantized layers: {lost[:5]}{more}; the checkpoint does not "
                "match its quantization_config (modules_to_not_convert, current_rank) or is incomplete"
            )
        expected = set(model.state_dict())
        for key in sorted(k for k in loaded if k.rpartition(".")[0] in packed and k not in expected):
            raise CheckpointError(
                f"{self.source}: tensor '{key}' is not part of the quantized layer '{key.rpartition('.')[0]}'"
            )

    # ---- while the weights are read ----------------------------------------------------------
    def check_if_quantized_param(
        self, model: nn.Module, param_value: torch.Tensor, param_name: str, state_dict: dict[str, Any], **kwargs: Any
    ) -> bool:
        if not self.pre_quantized:
            return False
        owner, _, _ = param_name.rpartition(".")
        try:
            return isinstance(model.get_submodule(owner), self.layer_types)
        except AttributeError:
            return False

    def check_quantized_param_shape(self, param_name: str, current_param: torch.Tensor, loaded_param: torch.Tensor):
        raise CheckpointError(
            f"{self.source}: tensor '{param_name}': expected shape {tuple(current_param.shape)} "
            f"(from the model config and quantization_config), got {tuple(loaded_param.shape)}"
        )

    def create_quantized_param(
        self,
        model: nn.Module,
        param_value: torch.Tensor,
        param_name: str,
        target_device: Any,
        state_dict: dict[str, Any] | None = None,
        unexpected_keys: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        owner, _, name = param_name.rpartition(".")
        module = model.get_submodule(owner)
        expected = module._parameters.get(name)
        if expected is None:
            raise CheckpointError(f"{self.source}: tensor '{param_name}' is not part of the quantized layer '{owner}'")
        # The raw tensor as stored: diffusers has already cast floating tensors to `torch_dtype`.
        raw = state_dict[param_name] if state_dict is not None and param_name in state_dict else param_value
        if raw.dtype == torch.uint8 and expected.dtype in (torch.int8, torch.float8_e4m3fn):
            raw = raw.view(expected.dtype)  # ComfyUI files may store int8 / fp8 bytes as uint8
        # The format's dtype rule (qvgen.packed_layer, a native layer's `keep_dtype`): bias and Φ follow the
        # compute dtype (fp32 inside `_keep_in_fp32_modules`); every other tensor keeps its fixed dtype.
        if fixed_dtype(module, name) is None:
            if not raw.is_floating_point():
                raise CheckpointError(f"{self.source}: tensor '{param_name}': expected a float tensor, got {raw.dtype}")
            keep_fp32 = any(m in param_name.split(".") for m in self.keep_in_fp32_modules)
            dtype = torch.float32 if keep_fp32 else (kwargs.get("dtype") or expected.dtype)
        elif raw.dtype != expected.dtype:
            raise CheckpointError(
                f"{self.source}: tensor '{param_name}': expected {expected.dtype} of shape {tuple(expected.shape)}, "
                f"got {raw.dtype} of shape {tuple(raw.shape)}"
            )
        else:
            dtype = expected.dtype
        if tuple(raw.shape) != tuple(expected.shape):
            self.check_quantized_param_shape(param_name, expected, raw)
        if name == "qweight":
            try:
                check_codes(raw, module.weight_bits, f"{self.source}: tensor '{param_name}'")
            except PackedLayerError as e:
                raise CheckpointError(str(e)) from None
        value = raw.to(device=target_device, dtype=dtype).contiguous()
        module._parameters[name] = nn.Parameter(value, requires_grad=False)

    # ---- after the weights are read ----------------------------------------------------------
    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:
            quantize_on_load(model, self)
        offloaded = _offloaded_tensors(model)  # device_map "disk": accelerate reloads them at each forward
        left = [n for n, p in model.named_parameters() if p.device.type == "meta" and n not in offloaded]
        if left:
            raise CheckpointError(f"{self.source}: tensors not found in the checkpoint: {left[:5]}")
        self._restore_offloaded_dtypes(model, offloaded)
        if self.scheme.file_format == "comfy":
            from ..adapters.comfy.kitchen import use_comfy_kitchen

            use_comfy_kitchen(model)  # comfy-kitchen's kernels for inputs on a GPU it has kernels for
        return model

    def _restore_offloaded_dtypes(self, model: nn.Module, offloaded: dict[str, Any]) -> None:
        """Give disk-offloaded packed tensors back their fixed dtype, read exactly from the checkpoint.

        diffusers casts every float tensor to `torch_dtype` before it offloads it to disk (only the
        tensors it hands to `create_quantized_param` keep theirs); accelerate would cast a bf16 copy
        back to float32 at each forward, so the scales would silently lose precision. The few
        affected tensors (scales, zero points, clipping factors: O(out) per layer) are read from the
        safetensors files and kept in the offload map in memory, where accelerate looks first.
        """
        wrong = {}
        for name, (loader, key) in offloaded.items():
            owner, _, tensor = name.rpartition(".")
            module = model.get_submodule(owner)
            fixed = fixed_dtype(module, tensor) if isinstance(module, self.layer_types) else None
            if fixed is not None and fixed.is_floating_point:
                if loader[key].dtype != fixed:  # a small tensor (scales, clipping factors), read once
                    wrong[name] = (loader, key, fixed)
        if not wrong:
            return
        if not self.files:
            raise CheckpointError(
                f"{self.source}: offloading QVGen layers to disk with torch_dtype={self.compute_dtype} needs "
                "diffusers>=0.39 (to re-read their float32 scales); upgrade diffusers, load without torch_dtype, "
                "or offload with enable_group_offload / enable_sequential_cpu_offload instead"
            )
        raw = _read_tensors(self.files, set(wrong))
        for name, (loader, key, fixed) in wrong.items():
            loader.state_dict[key] = raw[name].to(fixed)

    def _dequantize(self, model: nn.Module) -> nn.Module:
        """Replace every quantized layer by an `nn.Linear` holding its dequantized weight (+ Φ)."""
        for name, module in list(model.named_modules()):
            if not isinstance(module, self.layer_types):
                continue
            dtype = module.bias.dtype if module.bias is not None else (self.compute_dtype or torch.float32)
            linear = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device=next(module.parameters()).device,
                dtype=dtype,
            )
            with torch.no_grad():
                linear.weight.copy_(module.dequantize_weight(dtype))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            model.set_submodule(name, linear)
        return model

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def fixed_dtype(module: nn.Module, name: str) -> torch.dtype | None:
    """The dtype a quantized layer's tensor keeps whatever `torch_dtype` is (None: it follows the
    compute dtype): `PACKED_TENSORS` for QVGen's layer; for the others, integer and fp8 tensors and
    those the layer lists in `keep_dtype`."""
    if isinstance(module, PackedLinear):
        return PACKED_TENSORS[name].dtype if name in PACKED_TENSORS else None
    p = module._parameters.get(name)
    if p is None:
        return None
    if not p.is_floating_point() or p.element_size() == 1 or name in getattr(module, "keep_dtype", ()):
        return p.dtype
    return None


def _offloaded_tensors(model: nn.Module) -> dict[str, tuple[Any, str]]:
    """Parameters accelerate keeps off the model (on `meta`): full name -> (offload map, its key)."""
    out: dict[str, tuple[Any, str]] = {}
    for mname, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
        for h in hooks:
            weights = getattr(h, "weights_map", None) if getattr(h, "offload", False) else None
            if weights is None:
                continue
            loader, prefix = getattr(weights, "dataset", weights), getattr(weights, "prefix", "")
            keys = set(getattr(loader, "all_keys", None) or loader.keys())  # keys only: no tensor is read
            for pname, p in module.named_parameters(recurse=False):
                if p.device.type == "meta" and prefix + pname in keys:
                    out[f"{mname}.{pname}" if mname else pname] = (loader, prefix + pname)
    return out


def _read_tensors(files: list[Path], names: set[str]) -> dict[str, torch.Tensor]:
    """The tensors `names` exactly as stored in the safetensors `files`."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in names.intersection(h.keys()):
                out[k] = h.get_tensor(k)
    missing = sorted(names - set(out))
    if missing:
        raise CheckpointError(f"{files[0].parent}: tensors not found in the checkpoint: {missing[:5]}")
    return out


def _header_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Shape/dtype-only stand-ins (meta tensors) for every tensor of the safetensors files."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    s = h.get_slice(k)
                    out[k] = torch.empty(s.get_shape(), dtype=_ST_DTYPES.get(s.get_dtype(), torch.uint8), device="meta")
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return out


_ST_DTYPES = {
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "BOOL": torch.bool,
}


@torch.no_grad()
def quantize_on_load(model: nn.Module, quantizer: QVGenQuantizer) -> None:
    """Round-to-nearest PTQ of a loaded full-precision model, one layer at a time, in place.

    QVGen's clip search through `qvgen.packed_layer.quantize_linear` (the same code as ComfyUI's
    Quantize node), no Φ (rank 0) and one activation-clipping bucket (every bucket would hold the
    initial factors); the config diffusers saves says so. Layers the scheme cannot quantize stay
    in full precision, as in `convert_model`.
    """
    requested = quantizer.quantization_config
    config = QVGenQuantizationConfig.from_dict({**requested.to_dict(), "rank": 0, "current_rank": 0, "n_buckets": 1})
    logger.warning(PTQ_WARNING, config.weight_bits, config.act_bits or 16)
    core = config.to_qvgen_config()
    state = timestep_state(model, core)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, (QVGenLinear, PackedLinear)):
            continue
        if not core.should_convert(name) or unsupported_reason(module, core):
            continue
        tensors = quantize_linear(module.weight, module.bias, core, name=name, clip_search=True)
        layer = PackedLinear.from_tensors(tensors, core, module.in_features, dtype=module.weight.dtype, name=name)
        layer.timestep_state = state
        model.set_submodule(name, layer)
    quantizer.quantization_config = config
    quantizer.pre_quantized = True  # from now on the model holds packed layers (save, reload)
    if hasattr(model, "register_to_config"):
        model.register_to_config(quantization_config=config)
