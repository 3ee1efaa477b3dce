"""`QVGenQuantizationConfig`: `QVGenConfig` in the shape diffusers expects of a `quantization_config`.

It *is* a `QVGenConfig` (same fields, same validation, same JSON) and a diffusers
`QuantizationConfigMixin`; the only difference is `quant_method`, a `str` enum member whose
`.value` diffusers reads. A plain `QVGenConfig` passed to `from_pretrained` is converted to it.
"""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path
from typing import Any

from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from ..config import QUANT_METHOD, QVGenConfig


class QVGenQuantizationMethod(str, enum.Enum):
    """Like diffusers' `QuantizationMethod` (a str enum): equal to, and hashing as, "qvgen"."""

    QVGEN = QUANT_METHOD


class QVGenQuantizationConfig(QVGenConfig, QuantizationConfigMixin):
    """Diffusers `quantization_config` for `quant_method: "qvgen"` (see `qvgen.QVGenConfig` for the fields).

    ```python
    import qvgen
    from diffusers import WanTransformer3DModel

    # a QVGen checkpoint: the config is read from its config.json
    model = WanTransformer3DModel.from_pretrained("org/wan-w4a4", subfolder="transformer")
    # a full-precision model, quantized on load (round-to-nearest; QAT checkpoints are much better)
    model = WanTransformer3DModel.from_pretrained(base, subfolder="transformer",
                                                  quantization_config=qvgen.QVGenConfig(weight_bits=4, act_bits=4))
    ```
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.quant_method = QVGenQuantizationMethod.QVGEN

    @classmethod
    def from_qvgen_config(cls, config: QVGenConfig | dict[str, Any]) -> QVGenQuantizationConfig:
        """The diffusers form of a `QVGenConfig` (returned as is when it already is one)."""
        if isinstance(config, cls):
            return config
        return cls.from_dict(config if isinstance(config, dict) else QVGenConfig.to_dict(config))

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Strict like `QVGenConfig.from_dict` (unknown keys are errors); diffusers' signature."""
        config = super().from_dict(config_dict, source="config.json: quantization_config")
        unused = config.update(**kwargs) if kwargs else {}
        return (config, unused) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["quant_method"] = QUANT_METHOD  # a plain string in JSON and in comparisons
        return data

    def to_diff_dict(self) -> dict[str, Any]:
        """Every field, always (the checkpoint states all its settings)."""
        return self.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return self.to_json()

    @classmethod
    def from_single_file(cls, path: str | os.PathLike) -> QVGenQuantizationConfig:
        """The `quantization_config` a QVGen single file records in its metadata (a ComfyUI-native export
        or a QVGen single file), for `from_single_file(path, quantization_config=...)`; reads the header only."""
        from ..checkpoint import META_QCONFIG, CheckpointError, read_safetensors_metadata

        raw = read_safetensors_metadata(Path(path)).get(META_QCONFIG)
        if raw is None:
            raise CheckpointError(
                f"{path}: no '{META_QCONFIG}' in the safetensors metadata (not written by QVGen); "
                "load a ComfyUI-native file without it through qvgen.load_comfy_native"
            )
        return cls.from_dict(json.loads(raw))

    def to_qvgen_config(self) -> QVGenConfig:
        """The plain core config (for `qvgen.checkpoint`, `build_packed_model`, …)."""
        return QVGenConfig.from_dict(self.to_dict())
