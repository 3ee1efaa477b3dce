"""ComfyUI's native checkpoint format (ConvRot W4A4, NVFP4, SVDQuant W4A4, grouped W4A8): export,
inspection and loading.

A model trained with a scheme whose file format is "comfy" (`convrot_w4a4`, `nvfp4`,
`svdquant_w4a4`, `w4a8_int8`) is written as
one `.safetensors` file that current ComfyUI loads with its stock "Load Diffusion Model" node and
runs with comfy-kitchen's kernels (no custom node):

- tensors under ComfyUI's Wan names (`blocks.0.self_attn.q.weight`, see `qvgen.adapters.comfy.names`);
- per quantized layer: `weight` int8 `(out, K/2)` (packed signed int4), `weight_scale` float32
  `(out,)`, `bias` in the export dtype, and `comfy_quant`, a uint8 tensor holding the layer's JSON
  (`{"format": "convrot_w4a4", "convrot_groupsize": 256}`), which ComfyUI's mixed-precision
  loader reads; an `nvfp4` layer has instead `weight` uint8 `(out, K/2)` (packed e2m1), `weight_scale`
  fp8 e4m3 (block scales, cuBLAS-swizzled), `weight_scale_2` and `input_scale` float32 scalars
  (`{"format": "nvfp4"}`; see `qvgen.schemes.nvfp4`);
- header metadata `_quantization_metadata` = `{"format_version": "1.0", "layers": {name: conf}}`,
  the same per-layer entries (ComfyUI's `convert_old_quants` turns it into `comfy_quant` tensors),
  plus QVGen's own `quantization_config` (scheme `convrot_w4a4`) and `model_config`, so
  `qvgen.load_quantized_model` can rebuild the model;
- every other tensor (norms, patch embedding, layers the scheme cannot run: ConvRot needs K a
  multiple of 256, NVFP4 a multiple of 16) in the export dtype, bf16 by default.

Each ComfyUI layer format is one row of `LAYER_FORMATS`: the scheme that writes it, its
`comfy_quant` entry, the checks of its tensors, and the PyTorch layer that runs it. SVDQuant's and
the grouped W4A8's tensors are described in their scheme modules (`qvgen.schemes.svdquant`,
`qvgen.schemes.w4a8`) and docs/comfyui.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ...atomic import atomic_dir, atomic_file
from ...checkpoint import CheckpointError, indexed_shards, jsonable, read_safetensors, unquantized_tensors
from ...config import FORMAT_VERSION, ConfigError, QVGenConfig
from ...layers import QVGenLinear
from ...schemes import convrot, get_scheme, nvfp4, svdquant, w4a8
from ...schemes.convrot import ConvRotLinear
from ...schemes.nvfp4 import NVFP4Linear
from ...surgery import build_packed_model, unsupported_reason
from ..diffusers_models import empty_model
from .kitchen import use_comfy_kitchen
from .names import comfy_to_diffusers, diffusers_to_comfy, to_comfy_state_dict, to_diffusers_state_dict

META_COMFY_QUANT = "_quantization_metadata"
META_QCONFIG = "quantization_config"
META_MODEL_CONFIG = "model_config"
COMFY_QUANT_VERSION = "1.0"


class ComfyNativeError(ValueError):
    """A ComfyUI-native export or file is not what this module expects (names file and tensor)."""


@dataclass
class ComfyExportReport:
    """What `export_comfy` wrote: quantized layers, layers kept in full precision and why, file size."""

    path: Path
    quantized: list[str] = field(default_factory=list)
    full_precision: dict[str, str] = field(default_factory=dict)  # ComfyUI name → reason
    bytes: int = 0
    layer_format: str = convrot.COMFY_FORMAT
    notes: list[str] = field(default_factory=list)  # what a user of the file should know (runtime caveats)

    def __str__(self) -> str:
        text = (
            f"{self.path}: {len(self.quantized)} {self.layer_format} layers, "
            f"{len(self.full_precision)} linear layers kept in full precision, {self.bytes / 2**20:.1f} MiB"
        )
        for name, why in sorted(self.full_precision.items()):
            text += f"\n  full precision: {name} ({why})"
        for note in self.notes:
            text += f"\n  note: {note}"
        return text


def runtime_notes(config: QVGenConfig) -> list[str]:
    """Caveats of running the file in ComfyUI, printed with the export report (docs/comfyui.md)."""
    if config.scheme == "convrot_w4a4" and config.act_bits == 8:
        return [
            "linear_dtype 'int8' is honoured by comfy-kitchen's CUDA backend only (torch built for CUDA >= 13); "
            "its eager backend (CPU, and GPUs where ComfyUI disables the CUDA backend) ignores it and quantizes "
            "tokens to int4, further from the trained model. --scheme w4a8_int8 runs int8 tokens on every backend."
        ]
    return []


# ---- export --------------------------------------------------------------------------------------
def _layer_tensors(module: nn.Module) -> dict[str, Tensor]:
    if isinstance(module, QVGenLinear):
        if get_scheme(module.scheme_name).file_format != "comfy":
            raise ComfyNativeError(
                f"model was trained with scheme {module.scheme_name!r}, which does not export to ComfyUI's format"
            )
        return module.export_tensors()
    return {k: v.detach() for k, v in module.state_dict().items()}


def comfy_native_state_dict(
    model: nn.Module, config: QVGenConfig, dtype: torch.dtype | None = torch.bfloat16
) -> tuple[dict[str, Tensor], dict[str, dict], dict[str, str]]:
    """ComfyUI-named tensors, per-layer `comfy_quant` entries, and the linear layers left in full precision."""
    out, confs, kept = native_state_dict(model, config, dtype)
    try:
        out = to_comfy_state_dict(out)
    except ValueError as e:
        raise ComfyNativeError(f"ComfyUI-native export supports Wan 2.1 transformers: {e}") from None

    quant = {diffusers_to_comfy(n): dict(c) for n, c in confs.items()}
    kept = {diffusers_to_comfy(n): why for n, why in kept.items()}
    for name, c in quant.items():
        out[f"{name}.comfy_quant"] = encode_layer_conf(c)
    return out, quant, kept


def native_state_dict(
    model: nn.Module, config: QVGenConfig, dtype: torch.dtype | None = torch.bfloat16
) -> tuple[dict[str, Tensor], dict[str, dict], dict[str, str]]:
    """The same under diffusers' names (the inference layers' state dict, without `comfy_quant`): what
    the diffusers folder of a ComfyUI-native scheme holds, and what its diffusers model loads."""
    fmt = scheme_format(config.scheme)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (QVGenLinear, *COMFY_LAYER_TYPES))}
    confs = {n: fmt.conf(m, config) for n, m in layers.items()}
    out: dict[str, Tensor] = {}
    for name, module in layers.items():
        try:
            tensors = _layer_tensors(module)
        except ValueError as e:
            raise ComfyNativeError(f"layer '{name}': {e}") from None
        for key, t in tensors.items():
            t = t.detach().to("cpu")
            if key in fmt.export_cast and dtype is not None:
                t = t.to(dtype)
            out[f"{name}.{key}"] = t.contiguous().clone()
    out.update(unquantized_tensors(model, layers, dtype))
    kept: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in layers:
            kept[name] = unsupported_reason(module, config) or "not selected by the config"
    return out, confs, kept


def encode_layer_conf(conf: dict) -> Tensor:
    """A layer's JSON as the uint8 tensor ComfyUI stores under `<layer>.comfy_quant`."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def decode_layer_conf(t: Tensor) -> dict:
    """Inverse of `encode_layer_conf` (what ComfyUI's loader does: `json.loads(t.numpy().tobytes())`)."""
    return json.loads(t.numpy().tobytes())


def export_comfy(
    model: nn.Module,
    config: QVGenConfig,
    path: str | os.PathLike,
    *,
    model_config: dict[str, Any] | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
) -> ComfyExportReport:
    """Write a model of a ComfyUI-native scheme as one `.safetensors` file (atomically).

    `model` is a training-form model (`QVGenLinear` layers; Φ at rank 0, or for `svdquant_w4a4`
    at the rank it keeps) or one loaded with `load_comfy_native`. Linear layers the scheme cannot
    run were never converted and are stored in `dtype`, as ComfyUI expects of a layer without a
    `comfy_quant` entry; so are the format's `export_cast` tensors (bias; SVDQuant's scales, branch
    and smoothing), which comfy-kitchen computes with.
    """
    fmt = scheme_format(config.scheme)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ComfyNativeError(f"{path}: a ComfyUI diffusion model is one file ending in .safetensors")
    tensors, quant, kept = comfy_native_state_dict(model, config, dtype)
    meta = {
        META_COMFY_QUANT: json.dumps({"format_version": COMFY_QUANT_VERSION, "layers": quant}),
        META_QCONFIG: shipped_config(config).to_json(),
        META_MODEL_CONFIG: json.dumps(jsonable(_model_config(model) if model_config is None else model_config)),
        "format": "pt",
    }
    atomic_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return ComfyExportReport(path, sorted(quant), kept, path.stat().st_size, fmt.name, runtime_notes(config))


def shipped_config(config: QVGenConfig) -> QVGenConfig:
    """The config an export records: Φ's rank as shipped (a kept low-rank branch, else 0) and this format version."""
    rank = config.final_rank if get_scheme(config.scheme).phi_sees_input else 0
    return QVGenConfig.from_dict({**config.to_dict(), "current_rank": rank, "format_version": FORMAT_VERSION})


def _model_config(model: nn.Module) -> dict[str, Any]:
    model_config = dict(getattr(model, "config", {}) or {})
    if model_config:  # diffusers models: record the class the way `save_config` does
        model_config.setdefault("_class_name", type(model).__name__)
    return model_config


def export_native_folder(
    model: nn.Module,
    config: QVGenConfig,
    path: str | os.PathLike,
    *,
    model_config: dict[str, Any] | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
    max_shard_size: str = "10GB",
) -> Path:
    """Write a model of a ComfyUI-native scheme as a diffusers model folder (atomically): `config.json`
    with its `quantization_config`, the inference layers' tensors under diffusers' names, the same
    tensors and dtypes as `export_comfy`'s file. `WanTransformer3DModel.from_pretrained` loads it
    once `qvgen` is imported (docs/diffusers.md)."""
    from huggingface_hub import save_torch_state_dict

    path = Path(path)
    tensors, _, _ = native_state_dict(model, config, dtype)
    cfg = jsonable(_model_config(model) if model_config is None else model_config)
    cfg["quantization_config"] = shipped_config(config).to_dict()

    def write(folder: Path) -> None:
        save_torch_state_dict(
            tensors,
            folder,
            filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
            max_shard_size=max_shard_size,
            metadata={"format": "pt"},
        )
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    atomic_dir(path, write)
    return path


def strip_layer_confs(state: dict[str, Tensor], scheme: str, source: str) -> dict[str, Tensor]:
    """A ComfyUI-native state dict (ComfyUI names) checked layer by layer against `scheme`'s format
    and without its `comfy_quant` entries: what diffusers' single-file loader can map to its names."""
    fmt = scheme_format(scheme)
    out = dict(state)
    for key in [k for k in state if k.endswith(".comfy_quant")]:
        name = key[: -len(".comfy_quant")]
        try:
            conf = decode_layer_conf(out.pop(key))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ComfyNativeError(f"{source}: tensor '{key}': not a JSON layer config ({e})") from None
        if conf.get("format") != fmt.name:
            raise ComfyNativeError(
                f"{source}: tensor '{key}': layer format {conf.get('format')!r}, but quantization_config "
                f"has scheme {scheme!r} (format {fmt.name!r}); load the file with its own config "
                "(QVGenQuantizationConfig.from_single_file)"
            )
        _validate_layer(Path(source), out, name, conf)
    return out


# ---- reading -------------------------------------------------------------------------------------
@dataclass
class ComfyNativeFile:
    """A ComfyUI-native file: tensors (ComfyUI names), per-layer confs, our config if present."""

    path: Path
    state_dict: dict[str, Tensor]
    layers: dict[str, dict]
    config: QVGenConfig | None
    model_config: dict[str, Any]


def read_comfy_native(path: str | os.PathLike) -> ComfyNativeFile:
    """Read and validate a ComfyUI-native file the way ComfyUI does (header metadata, then `comfy_quant`)."""

    path = Path(path)
    try:
        state, meta = read_safetensors(path)
    except CheckpointError as e:
        raise ComfyNativeError(str(e)) from None
    state = {k.removeprefix("model.diffusion_model."): v for k, v in state.items()}
    layers: dict[str, dict] = {}
    if META_COMFY_QUANT in meta:
        try:
            raw = json.loads(meta[META_COMFY_QUANT])["layers"]
            layers = {k.removeprefix("model.diffusion_model."): dict(v) for k, v in raw.items()}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ComfyNativeError(f"{path}: metadata '{META_COMFY_QUANT}' is not valid ({e})") from None
    for key in [k for k in state if k.endswith(".comfy_quant")]:
        name = key[: -len(".comfy_quant")]
        try:
            layers.setdefault(name, decode_layer_conf(state.pop(key)))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ComfyNativeError(f"{path}: tensor '{key}': not a JSON layer config ({e})") from None
    if not layers:
        raise ComfyNativeError(f"{path}: no '{META_COMFY_QUANT}' metadata and no '*.comfy_quant' tensors")
    for name, conf in layers.items():
        _validate_layer(path, state, name, conf)
    config = None
    if META_QCONFIG in meta:
        try:
            config = QVGenConfig.from_json(meta[META_QCONFIG], source=f"{path}: metadata '{META_QCONFIG}'")
        except ConfigError as e:
            raise ComfyNativeError(str(e)) from None
    try:
        model_config = json.loads(meta.get(META_MODEL_CONFIG, "{}"))
    except json.JSONDecodeError as e:
        raise ComfyNativeError(f"{path}: metadata '{META_MODEL_CONFIG}' is not valid JSON ({e})") from None
    return ComfyNativeFile(path, state, layers, config, model_config)


def _validate_layer(path: Path, state: dict[str, Tensor], name: str, conf: dict) -> None:
    def fail(key: str, what: str, got: Any) -> None:
        raise ComfyNativeError(f"{path}: tensor '{name}.{key}': expected {what}, got {got}")

    fmt = conf.get("format")
    if fmt not in LAYER_FORMATS:
        raise ComfyNativeError(f"{path}: layer '{name}': format {fmt!r}; this loader reads {sorted(LAYER_FORMATS)}")
    why = LAYER_FORMATS[fmt].conf_error(conf)
    if why:
        raise ComfyNativeError(f"{path}: layer '{name}': {why}")
    LAYER_FORMATS[fmt].validate(state, name, fail)


def _need(state: dict[str, Tensor], name: str, key: str, fail: Callable[[str, str, Any], None]) -> Tensor:
    t = state.get(f"{name}.{key}")
    if t is None:
        fail(key, "a tensor", "nothing (missing)")
    return t


def _convrot_conf_error(conf: dict) -> str | None:
    group = int(conf.get("convrot_groupsize", convrot.CONVROT_GROUP))
    if group != convrot.CONVROT_GROUP:
        return f"convrot_groupsize {group}; expected {convrot.CONVROT_GROUP}"
    if conf.get("linear_dtype", "int4") not in ("int4", "int8"):
        return f"linear_dtype {conf['linear_dtype']!r}; expected int4 or int8"
    return None


def _convrot_validate(state: dict[str, Tensor], name: str, fail: Callable[[str, str, Any], None]) -> None:
    w = _need(state, name, "weight", fail)
    if w.dtype not in (torch.int8, torch.uint8) or w.dim() != 2:
        fail("weight", "a 2-D int8 tensor (packed int4)", f"{w.dtype} of shape {tuple(w.shape)}")
    k = w.shape[1] * 2
    if not convrot.supports(k, convrot.CONVROT_GROUP):
        fail("weight", f"K = 2 × columns divisible by {convrot.CONVROT_GROUP}", f"K = {k}")
    s = _need(state, name, "weight_scale", fail)
    if not s.is_floating_point() or s.numel() != w.shape[0]:
        fail("weight_scale", f"{w.shape[0]} floats (one per output row)", f"{s.dtype} of shape {tuple(s.shape)}")
    b = state.get(f"{name}.bias")
    if b is not None and b.shape != (w.shape[0],):
        fail("bias", f"shape ({w.shape[0]},)", tuple(b.shape))


def _nvfp4_validate(state: dict[str, Tensor], name: str, fail: Callable[[str, str, Any], None]) -> None:
    w = _need(state, name, "weight", fail)
    if w.dtype != torch.uint8 or w.dim() != 2 or w.shape[0] % nvfp4.BLOCK or (w.shape[1] * 2) % nvfp4.BLOCK:
        fail("weight", "a 2-D uint8 tensor (packed e2m1, rows and K multiples of 16)", f"{w.dtype} {tuple(w.shape)}")
    rows, k = w.shape[0], w.shape[1] * 2
    s = _need(state, name, "weight_scale", fail)
    want = (nvfp4.roundup(rows, nvfp4.TILE_ROWS), nvfp4.roundup(k // nvfp4.BLOCK, nvfp4.TILE_COLS))
    if s.dtype not in (torch.float8_e4m3fn, torch.uint8) or tuple(s.shape) != want:
        fail("weight_scale", f"float8_e4m3fn block scales of shape {want} (swizzled)", f"{s.dtype} {tuple(s.shape)}")
    for key in ("weight_scale_2", "input_scale"):
        t = state.get(f"{name}.{key}") if key == "input_scale" else _need(state, name, key, fail)
        if t is not None and (not t.is_floating_point() or t.numel() != 1):
            fail(key, "one float (a per-tensor scale)", f"{t.dtype} of shape {tuple(t.shape)}")
    b = state.get(f"{name}.bias")
    if b is not None and (b.dim() != 1 or not rows - nvfp4.BLOCK < b.shape[0] <= rows):
        fail("bias", f"one value per output row ({rows} rows stored, padded to 16)", tuple(b.shape))


# ---- loading into a PyTorch model ---------------------------------------------------------------
@dataclass(frozen=True)
class LayerFormat:
    """One ComfyUI layer format (its `"format"` in `comfy_quant`), written by the scheme `scheme`:
    `conf(layer, config)`, a layer's `comfy_quant` entry; `conf_error` and `validate`, the checks of a
    layer's entry and tensors in a file; `build(name, linear, conf, tensors, dtype, options)`, the
    PyTorch layer that runs it (`tensors`: the layer's own tensors in the file; `options`:
    `load_comfy_native`'s overrides; a ValueError names what does not fit); `export_cast`, the
    exported tensors stored in the export dtype (the others keep the format's dtype)."""

    name: str
    scheme: str
    conf: Callable[[nn.Module, QVGenConfig], dict]
    conf_error: Callable[[dict], str | None]
    validate: Callable[[dict[str, Tensor], str, Callable[[str, str, Any], None]], None]
    build: Callable[[str, nn.Module, dict, dict[str, Tensor], torch.dtype, dict[str, Any]], nn.Module]
    export_cast: tuple[str, ...] = ("bias",)


def _convrot_build(name, linear, conf, tensors, dtype, options) -> nn.Module:
    bits = options.get("act_bits") or act_bits_of(conf)
    return ConvRotLinear(linear.in_features, linear.out_features, linear.bias is not None, bits, dtype)


def _nvfp4_build(name, linear, conf, tensors, dtype, options) -> nn.Module:
    q = options.get("quantize_input")
    return NVFP4Linear(
        linear.in_features,
        linear.out_features,
        linear.bias is not None,
        dtype,
        input_scale="input_scale" in tensors,
        quantize_input=True if q is None else q,
    )


def _packed_weight_validate(state: dict[str, Tensor], name: str, fail: Callable[[str, str, Any], None]) -> None:
    """The file-level check of SVDQuant / W4A8 layers; their scheme's `from_comfy` checks the rest
    against the model's layer when loading."""
    w = _need(state, name, "weight", fail)
    if w.dtype not in (torch.int8, torch.uint8) or w.dim() != 2:
        fail("weight", "a 2-D int8 tensor (packed 4-bit codes)", f"{w.dtype} of shape {tuple(w.shape)}")


def _from_scheme(from_comfy: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    return lambda name, linear, conf, tensors, dtype, options: from_comfy(name, conf, tensors, linear, dtype)


LAYER_FORMATS: dict[str, LayerFormat] = {
    f.name: f
    for f in (
        LayerFormat(
            convrot.COMFY_FORMAT,
            "convrot_w4a4",
            lambda layer, c: convrot.comfy_layer_conf(c.act_bits),
            _convrot_conf_error,
            _convrot_validate,
            _convrot_build,
        ),
        LayerFormat(
            nvfp4.COMFY_FORMAT,
            "nvfp4",
            lambda layer, c: nvfp4.comfy_layer_conf(c),
            lambda conf: None,
            _nvfp4_validate,
            _nvfp4_build,
        ),
        LayerFormat(
            svdquant.COMFY_FORMAT,
            "svdquant_w4a4",
            svdquant.layer_conf,
            lambda conf: None,
            _packed_weight_validate,
            _from_scheme(svdquant.from_comfy),
            svdquant.EXPORT_CAST,
        ),
        LayerFormat(
            w4a8.COMFY_FORMAT,
            w4a8.SCHEME_NAME,
            w4a8.layer_conf,
            lambda conf: None,
            _packed_weight_validate,
            _from_scheme(w4a8.from_comfy),
        ),
    )
}
# the inference layers of every ComfyUI format, from their schemes
COMFY_LAYER_TYPES = tuple(t for f in LAYER_FORMATS.values() for t in get_scheme(f.scheme).inference_types)
_BY_SCHEME = {f.scheme: f for f in LAYER_FORMATS.values()}


def scheme_format(scheme: str) -> LayerFormat:
    """The ComfyUI layer format a scheme exports to."""
    try:
        return _BY_SCHEME[scheme]
    except KeyError:
        raise ComfyNativeError(
            f"scheme {scheme!r} has no ComfyUI layer format; expected one of {sorted(_BY_SCHEME)}"
        ) from None


def act_bits_of(conf: dict) -> int:
    """Token bits a layer runs with: 8 when flagged `linear_dtype: "int8"`, else 4 (int4 MMA, eager)."""
    return 8 if conf.get("linear_dtype") == "int8" else 4


def load_comfy_native(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    act_bits: int | None = None,
    quantize_input: bool | None = None,
) -> nn.Module:
    """Run a ComfyUI-native file in PyTorch: each quantized layer becomes its format's inference layer
    (`ConvRotLinear`, `NVFP4Linear`, `SVDQuantLinear`, `W4A8Linear`).

    `model` is an (empty) diffusers Wan transformer to fill; without it the model is built from
    the file's `model_config` (written by `export_comfy`). `act_bits` overrides ConvRot's token bits
    (default: what each layer's entry says — 4, or 8 for `linear_dtype: "int8"`). `quantize_input`
    (NVFP4): True (default) quantizes inputs as ComfyUI does on FP4 GPUs (RTX 50, B200); False is
    what ComfyUI computes on every other device (dequantized weight, unquantized input).
    """
    f = read_comfy_native(path)
    if model is None:
        model = _build_model(f)
    state = to_diffusers_state_dict(f.state_dict)

    for comfy_name, conf in f.layers.items():
        name = comfy_to_diffusers(comfy_name)
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ComfyNativeError(f"{f.path}: layer '{comfy_name}' ({name}) is not in the model") from None
        k = state[f"{name}.weight"].shape[1] * 2
        if linear.in_features != k:
            raise ComfyNativeError(
                f"{f.path}: tensor '{comfy_name}.weight': expected a layer {linear.in_features}→"
                f"{linear.out_features}, got K={k}"
            )
        own = {key[len(name) + 1 :]: t for key, t in state.items() if key.rpartition(".")[0] == name}
        options = {"act_bits": act_bits, "quantize_input": quantize_input}
        try:
            layer = LAYER_FORMATS[conf["format"]].build(comfy_name, linear, conf, own, dtype, options)
        except ValueError as e:
            raise ComfyNativeError(f"{f.path}: {e}") from None
        model.set_submodule(name, layer)
    return _finish(model, state, f.path, dtype, device)


def _finish(model: nn.Module, state: dict[str, Tensor], path: Path, dtype: torch.dtype, device) -> nn.Module:
    _load_strict(model, state, path)
    model.to(device=device)
    for m in model.modules():  # full-precision tensors follow the compute dtype; codes and scales keep theirs
        for pname, p in list(m.named_parameters(recurse=False)):
            if p.is_floating_point() and pname not in getattr(m, "keep_dtype", ()):
                setattr(m, pname, nn.Parameter(p.data.to(dtype), requires_grad=False))
    use_comfy_kitchen(model)  # comfy-kitchen's kernels for inputs on a GPU it has kernels for
    return model.eval()


def native_folder_config(folder: Path) -> QVGenConfig | None:
    """The config of a diffusers folder written by `export_native_folder` (None for any other folder)."""
    try:
        raw = json.loads((folder / "config.json").read_text()).get(META_QCONFIG)
        config = QVGenConfig.from_dict(raw, source=f"{folder / 'config.json'}: {META_QCONFIG}")
    except (OSError, json.JSONDecodeError, AttributeError, TypeError, ConfigError):
        return None
    return config if config.scheme in _BY_SCHEME else None


def load_native_folder(
    folder: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    model_cls: type[nn.Module] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """`load_comfy_native` for the diffusers folder of a ComfyUI-native scheme (`export_native_folder`):
    the scheme's inference layers (`Scheme.shell`) filled with the folder's tensors, checked strictly.
    Without `model`, an empty one is built from the folder's config.json (as `model_cls` when given)."""

    folder = Path(folder)
    config = native_folder_config(folder)
    if config is None:
        raise ComfyNativeError(f"{folder}: no config.json with a ComfyUI-native scheme's '{META_QCONFIG}'")
    if model is None:
        model = empty_model(json.loads((folder / "config.json").read_text()), folder, model_cls)
    build_packed_model(model, config, dtype=dtype, device="meta")
    state: dict[str, Tensor] = {}
    for f in indexed_shards(folder) or [folder / "diffusion_pytorch_model.safetensors"]:
        try:
            state.update(read_safetensors(f)[0])
        except CheckpointError as e:
            raise ComfyNativeError(str(e)) from None
    return _finish(model, state, folder, dtype, device)


def _build_model(f: ComfyNativeFile) -> nn.Module:

    if not f.model_config.get("_class_name"):
        raise ComfyNativeError(f"{f.path}: no '{META_MODEL_CONFIG}' with '_class_name' in the metadata; pass model=")
    return empty_model(f.model_config, f.path)


def _load_strict(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ComfyNativeError(
            f"{path}: does not match the model: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}"
        )
    for key, t in state.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise ComfyNativeError(
                f"{path}: tensor '{key}': expected shape {tuple(expected[key].shape)}, got {tuple(t.shape)}"
            )
    fixed = {}
    for k, v in state.items():
        want = expected[k].dtype
        raw = v.dtype == torch.uint8 and want in (torch.int8, torch.float8_e4m3fn)  # bytes stored as uint8
        fixed[k] = v.view(want) if raw else v.to(want)
    model.load_state_dict(fixed, strict=True, assign=True)


def is_comfy_native(meta: dict[str, str]) -> bool:
    """Whether safetensors metadata marks a ComfyUI-native file written by `export_comfy`."""
    raw = meta.get(META_QCONFIG)
    try:
        return raw is not None and json.loads(raw).get("scheme") in _BY_SCHEME
    except (json.JSONDecodeError, AttributeError):
        return False
