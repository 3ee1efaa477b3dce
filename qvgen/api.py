"""Saving and loading a quantized model whatever its scheme: the one entry point the doors call.

A scheme's `file_format` picks the writer and reader: QVGen's packed checkpoint (`qvgen.checkpoint`,
docs/format.md) or ComfyUI's native single file (`qvgen.adapters.comfy.native`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters.comfy.native import (
    export_comfy,
    export_native_folder,
    is_comfy_native,
    load_comfy_native,
    load_native_folder,
    native_folder_config,
)
from .adapters.diffusers_models import empty_model
from .checkpoint import (
    META_MODEL_CONFIG,
    CheckpointError,
    load_checkpoint,
    load_packed_model,
    read_safetensors_metadata,
    save_packed,
)
from .config import QVGenConfig
from .schemes import get_scheme


def save_quantized(
    model: nn.Module,
    config: QVGenConfig,
    path: str | os.PathLike,
    *,
    model_config: dict[str, Any] | None = None,
    single_file: bool | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
    max_shard_size: str = "10GB",
) -> Path:
    """Write a quantized model: a QVGen checkpoint (a folder, or one file when `path` ends in
    `.safetensors`); for schemes shipped in ComfyUI's format, ComfyUI's single file when `path` ends
    in `.safetensors`, else a diffusers folder of the same tensors (`from_pretrained` loads it)."""
    path = Path(path)
    if get_scheme(config.scheme).file_format == "comfy":
        one_file = path.suffix == ".safetensors" if single_file is None else single_file
        if one_file != (path.suffix == ".safetensors"):
            raise CheckpointError(
                f"{path}: scheme {config.scheme!r} writes ComfyUI's single file to a path ending in .safetensors "
                "and a diffusers folder to any other path"
            )
        if one_file:
            return export_comfy(model, config, path, model_config=model_config, dtype=dtype).path
        return export_native_folder(
            model, config, path, model_config=model_config, dtype=dtype, max_shard_size=max_shard_size
        )
    return save_packed(
        model,
        config,
        path,
        model_config=model_config,
        single_file=single_file,
        dtype=dtype,
        max_shard_size=max_shard_size,
    )


def load_quantized_model(
    path: str | os.PathLike,
    *,
    model_cls: type[nn.Module] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Build the model a checkpoint describes (diffusers class from its config unless `model_cls`) and load it."""
    path = Path(path)
    if path.is_file():
        meta = read_safetensors_metadata(path)
        if is_comfy_native(meta):
            model = None
            if model_cls is not None:
                model = empty_model(json.loads(meta.get(META_MODEL_CONFIG, "{}")), path, model_cls)
            return load_comfy_native(path, model, dtype=dtype, device=device)
    elif native_folder_config(path) is not None:  # the diffusers folder of a ComfyUI-native scheme
        return load_native_folder(path, model_cls=model_cls, dtype=dtype, device=device)
    ckpt = load_checkpoint(path)
    model = empty_model(ckpt.model_config, path, model_cls)
    return load_packed_model(model, ckpt, str(path), dtype=dtype, device=device)
