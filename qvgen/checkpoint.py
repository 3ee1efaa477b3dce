"""The QVGen checkpoint format (docs/format.md): packed tensors in safetensors + a JSON config.

Two layouts of the same tensors: a diffusers model folder (`config.json` with a
`quantization_config` entry + `diffusion_pytorch_model*.safetensors`), which `from_pretrained`
and the Hub understand, and a single `.safetensors` file carrying both configs in its metadata
(ComfyUI's `models/diffusion_models`). Writes are atomic; reads validate before use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .atomic import atomic_dir, atomic_file
from .config import FORMAT_VERSION, ConfigError, QVGenConfig
from .layers import QVGenLinear
from .packed_layer import REQUIRED, PackedLayerError, check_codes, tensor_dtype
from .packed_linear import PackedLinear
from .schemes import get_scheme
from .surgery import build_packed_model, current_rank
from .transforms import uses_rotation, uses_smoothing

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
META_QCONFIG = "quantization_config"
META_MODEL_CONFIG = "model_config"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not match what QVGen expects."""


@dataclass
class Checkpoint:
    config: QVGenConfig
    model_config: dict[str, Any]
    state_dict: dict[str, Tensor]
    files: list[Path] = field(default_factory=list)

    @property
    def layer_names(self) -> list[str]:
        return sorted(k[: -len(".qweight")] for k in self.state_dict if k.endswith(".qweight"))


# ---- export ------------------------------------------------------------------------------------
@torch.no_grad()
def export_state_dict(model: nn.Module, dtype: torch.dtype | None = torch.bfloat16) -> dict[str, Tensor]:
    """Packed-format tensors of a model in training or inference form (model left unchanged).

    Quantized layers contribute their packed tensors; everything else (norms, convs, embeddings,
    layers kept in full precision) is stored as is, cast to `dtype` when floating point.
    """
    out: dict[str, Tensor] = {}
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (QVGenLinear, PackedLinear))}
    for name, module in quantized.items():
        tensors = module.export_tensors() if isinstance(module, QVGenLinear) else dict(module.state_dict())
        for key, t in tensors.items():
            if t is not None:
                out[f"{name}.{key}"] = t.detach().to("cpu").contiguous().clone()
    out.update(unquantized_tensors(model, quantized, dtype))
    return out


def unquantized_tensors(model: nn.Module, owners: Iterable[str], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """The model's tensors outside the modules named in `owners`, on the CPU, floats cast to `dtype`."""
    owners = tuple(owners)
    out: dict[str, Tensor] = {}
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if any(owner == q or owner.startswith(q + ".") for q in owners):
            continue
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[key] = t.contiguous().clone()
    return out


def finalize_config(config: QVGenConfig, model: nn.Module) -> QVGenConfig:
    """Copy of `config` with `current_rank` set from the model's Φ, in the current format version."""
    return QVGenConfig.from_dict(
        {**config.to_dict(), "current_rank": current_rank(model), "format_version": FORMAT_VERSION}
    )


def save_packed(
    model: nn.Module,
    config: QVGenConfig,
    path: str | os.PathLike,
    *,
    model_config: dict[str, Any] | None = None,
    single_file: bool | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
    max_shard_size: str = "10GB",
) -> Path:
    """Write a QVGen checkpoint (docs/format.md): a folder, or one file when `path` ends in `.safetensors`.

    Only schemes whose file format is QVGen's; `qvgen.api.save_quantized` picks the writer.
    """
    path = Path(path)
    if get_scheme(config.scheme).file_format != "qvgen":
        raise CheckpointError(f"{path}: scheme {config.scheme!r} is not written as a QVGen checkpoint")
    single_file = path.suffix == ".safetensors" if single_file is None else single_file
    config = finalize_config(config, model)
    if model_config is None:
        model_config = dict(getattr(model, "config", {}) or {})
        if model_config:  # diffusers models: record the class the way `save_config` does
            model_config.setdefault("_class_name", type(model).__name__)
    model_config = jsonable(model_config)
    tensors = export_state_dict(model, dtype)
    if single_file:
        meta = {
            META_QCONFIG: config.to_json(),
            META_MODEL_CONFIG: json.dumps(model_config),
            "format": "pt",
        }
        atomic_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    else:
        atomic_dir(path, lambda tmp: _write_folder(tmp, tensors, config, model_config, max_shard_size))
    return path


def _write_folder(
    folder: Path, tensors: dict[str, Tensor], config: QVGenConfig, model_config: dict, max_shard_size: str
) -> None:
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(
        tensors,
        folder,
        filename_pattern=WEIGHTS_PATTERN,
        max_shard_size=max_shard_size,
        metadata={"format": "pt"},
        safe_serialization=True,
    )
    cfg = {**model_config, "quantization_config": config.to_dict()}
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """`d` as plain JSON types (tuples as lists, anything else as its string)."""
    return json.loads(json.dumps(dict(d), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


# ---- load --------------------------------------------------------------------------------------
def read_safetensors(file: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of one file, with errors that name the file."""
    if not file.is_file():
        raise CheckpointError(f"{file}: no such checkpoint file")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    return tensors, meta


def read_safetensors_metadata(file: Path) -> dict[str, str]:
    """The header metadata of one file (no tensors read), with errors that name the file."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def indexed_shards(folder: Path) -> list[Path] | None:
    """The shard files a folder's diffusers safetensors index lists (None when it has no index)."""
    index = folder / INDEX_NAME
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    return [folder / f for f in sorted(set(weight_map.values()))]


def _folder_files(folder: Path) -> list[Path]:
    shards = indexed_shards(folder)
    if shards is not None:
        return shards
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [single]
    raise CheckpointError(f"{folder}: expected {WEIGHTS_NAME} or {INDEX_NAME} in the checkpoint folder")


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and validate a QVGen checkpoint (folder or single file)."""
    path = Path(path)
    if path.is_dir():
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            raise CheckpointError(f"{path}: not a QVGen checkpoint folder (no {CONFIG_NAME})")
        try:
            model_config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
        if "quantization_config" not in model_config:
            raise CheckpointError(f"{cfg_file}: no 'quantization_config' entry; this is not a QVGen checkpoint")
        qdict = model_config.pop("quantization_config")
        config = _parse_config(qdict, f"{cfg_file}: quantization_config")
        files = _folder_files(path)
        state: dict[str, Tensor] = {}
        for f in files:
            state.update(read_safetensors(f)[0])
    else:
        state, meta = read_safetensors(path)
        if META_QCONFIG not in meta:
            raise CheckpointError(
                f"{path}: no '{META_QCONFIG}' in the safetensors metadata; this is not a QVGen checkpoint"
            )
        config = _parse_config(meta[META_QCONFIG], f"{path}: metadata '{META_QCONFIG}'")
        try:
            model_config = json.loads(meta.get(META_MODEL_CONFIG, "{}"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: metadata '{META_MODEL_CONFIG}' is not valid JSON ({e})") from None
        files = [path]
    if get_scheme(config.scheme).file_format != "qvgen":
        raise CheckpointError(
            f"{path}: a ComfyUI-native checkpoint (scheme {config.scheme!r}), not a packed QVGen one; load it "
            "with ComfyUI's stock 'Load Diffusion Model' node or qvgen.load_quantized_model"
        )
    validate_state_dict(state, config, str(path))
    return Checkpoint(config, model_config, state, files)


def _parse_config(raw: Any, source: str) -> QVGenConfig:
    try:
        if isinstance(raw, str):
            return QVGenConfig.from_json(raw, source=source)
        return QVGenConfig.from_dict(raw, source=source)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def validate_state_dict(state: dict[str, Tensor], config: QVGenConfig, source: str) -> None:
    """Check every quantized layer's tensors for presence, dtype and mutually consistent shapes."""
    layers = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    if not layers:
        raise CheckpointError(f"{source}: no quantized layers (no '*.qweight' tensors)")
    # a layer whose qweight is missing would otherwise pass as a full-precision layer without a weight
    orphans = sorted({k.rpartition(".")[0] for k in state if k.rpartition(".")[2] in REQUIRED} - set(layers))
    if orphans:
        _expect(False, source, f"{orphans[0]}.qweight", "a tensor (the layer has its other packed tensors)", "nothing")
    for name in layers:
        _validate_layer(state, name, config, source)


def _expect(cond: bool, source: str, key: str, what: str, got: Any) -> None:
    if not cond:
        raise CheckpointError(f"{source}: tensor '{key}': expected {what}, got {got}")


def _validate_layer(state: dict[str, Tensor], name: str, config: QVGenConfig, source: str) -> None:
    for k in REQUIRED:
        _expect(f"{name}.{k}" in state, source, f"{name}.{k}", "a tensor", "nothing (missing)")
    q = state[f"{name}.qweight"]
    _expect(
        q.dtype == torch.uint8 and q.dim() == 2,
        source,
        f"{name}.qweight",
        "a 2-D uint8 tensor",
        f"{q.dtype} of shape {tuple(q.shape)}",
    )
    try:
        check_codes(q, config.weight_bits, f"{source}: tensor '{name}.qweight'")
    except PackedLayerError as e:
        raise CheckpointError(str(e)) from None
    n = q.shape[0]
    for k, dt in (
        ("weight_scale", torch.float32),
        ("weight_zero", torch.float32),
        ("weight_qsum", torch.int32),
    ):
        t = state[f"{name}.{k}"]
        _expect(
            t.shape == (n,) and t.dtype == dt,
            source,
            f"{name}.{k}",
            f"{dt} of shape ({n},)",
            f"{t.dtype} of shape {tuple(t.shape)}",
        )
    if config.act_bits is not None:
        key = f"{name}.act_clip"
        _expect(key in state, source, key, "a tensor (activation clipping factors)", "nothing (missing)")
        _expect(
            state[key].shape == (config.n_buckets, 2),
            source,
            key,
            f"shape ({config.n_buckets}, 2)",
            tuple(state[key].shape),
        )
    _validate_input_bits(state, name, config, source)
    down, up = state.get(f"{name}.phi_down"), state.get(f"{name}.phi_up")
    if (down is None) != (up is None):
        raise CheckpointError(f"{source}: layer '{name}': phi_down and phi_up must be present together")
    if down is not None:
        _expect(
            up.shape == (n, down.shape[0]),
            source,
            f"{name}.phi_up",
            f"shape ({n}, {down.shape[0]})",
            tuple(up.shape),
        )
        _expect(
            down.shape[0] <= (config.current_rank or 0),
            source,
            f"{name}.phi_down",
            f"rank ≤ current_rank={config.current_rank}",
            down.shape[0],
        )

    k = q.shape[1] * 2 if config.weight_bits <= 4 else q.shape[1]
    for needed, key in (
        (uses_rotation(config.input_transform), "input_signs"),
        (uses_smoothing(config.input_transform), "smooth"),
    ):
        if needed:
            t = state.get(f"{name}.{key}")
            _expect(
                t is not None,
                source,
                f"{name}.{key}",
                f"a tensor (input_transform={config.input_transform})",
                "nothing (missing)",
            )
            _expect(
                t.dim() == 1 and t.shape[0] in (k, k - 1),
                source,
                f"{name}.{key}",
                f"shape ({k},) or ({k - 1},)",
                tuple(t.shape),
            )
    bias = state.get(f"{name}.bias")
    if bias is not None:
        _expect(bias.shape == (n,), source, f"{name}.bias", f"shape ({n},)", tuple(bias.shape))


def _validate_input_bits(state: dict[str, Tensor], name: str, config: QVGenConfig, source: str) -> None:
    """A layer's `input_bits` tensor is there exactly when `layer_act_bits` gives it another width, and says it."""
    key = f"{name}.input_bits"
    t = state.get(key)
    try:
        want = config.act_bits_of(name)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if want == config.act_bits:
        _expect(t is None, source, key, f"no tensor (the layer has the model's act_bits={want})", "a tensor")
        return
    _expect(t is not None, source, key, f"a tensor (layer_act_bits gives the layer {want}-bit inputs)", "nothing")
    _expect(
        t.dtype == torch.uint8 and tuple(t.shape) == (1,),
        source,
        key,
        "uint8 of shape (1,)",
        f"{t.dtype} of shape {tuple(t.shape)}",
    )
    if t.device.type != "meta":
        _expect(int(t[0]) == want, source, key, f"{want} (layer_act_bits)", int(t[0]))


def load_into(model: nn.Module, ckpt: Checkpoint, source: str = "checkpoint") -> None:
    """Load checkpoint tensors into a model built by `build_packed_model`, checking every shape."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ckpt.state_dict))
    unexpected = sorted(set(ckpt.state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: does not match the model: missing tensors {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected tensors {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    for key, t in ckpt.state_dict.items():
        want = expected[key]
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: tensor '{key}': expected shape {tuple(want.shape)}, got {tuple(t.shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in ckpt.state_dict.items()}, strict=True, assign=True)


def load_packed_model(
    model: nn.Module, ckpt: Checkpoint, source: str, *, dtype: torch.dtype, device: str | torch.device
) -> nn.Module:
    """Load `ckpt` into `model` (a skeleton, e.g. on `meta`): its linear layers become packed shells first.

    The one dtype rule after loading: float tensors follow `dtype`, except where the format fixes
    theirs (scales, zero points, clipping factors stay float32; `qvgen.packed_layer.PACKED_TENSORS`).
    """
    build_packed_model(model, ckpt.config, dtype=dtype, device="meta")
    load_into(model, ckpt, source)
    model.to(device=device)
    for m in model.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            want = tensor_dtype(name, dtype) if isinstance(m, PackedLinear) else dtype
            if p.is_floating_point() and p.dtype != want:
                setattr(m, name, nn.Parameter(p.data.to(want), requires_grad=False))
    return model.eval()
