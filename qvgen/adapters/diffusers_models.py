"""diffusers model skeletons: the model a checkpoint's `model_config` describes, on `meta`."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..checkpoint import CheckpointError


def model_class(model_config: dict[str, Any], path: str | os.PathLike) -> type[nn.Module]:
    """The diffusers class named by the config's `_class_name`."""
    import diffusers  # imported on use: `import qvgen` must not pay for diffusers

    cls_name = model_config.get("_class_name")
    if not cls_name:
        raise CheckpointError(f"{path}: model config has no '_class_name'; pass model_cls explicitly")
    cls = getattr(diffusers, str(cls_name), None)
    if cls is None:
        raise CheckpointError(f"{path}: unknown diffusers model class {cls_name!r}")
    return cls


def empty_model(
    model_config: dict[str, Any], path: str | os.PathLike, model_cls: type[nn.Module] | None = None
) -> nn.Module:
    """The model a checkpoint's config describes (diffusers class from `_class_name` unless
    `model_cls` is given), its parameters on `meta`: no full-precision copy is materialised."""
    from accelerate import init_empty_weights

    cls = model_class(model_config, path) if model_cls is None else model_cls
    cfg = {k: v for k, v in model_config.items() if not k.startswith("_") and k != "quantization_config"}
    with init_empty_weights():
        return cls.from_config(cfg) if hasattr(cls, "from_config") else cls(**cfg)
