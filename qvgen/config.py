"""`QVGenConfig`: every quantization setting of a QVGen model, serialisable to JSON.

The same object travels through training, the checkpoint's `quantization_config`, the diffusers
backend and the ComfyUI loader, so a checkpoint always says exactly how to rebuild its layers.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .quantizers import ZERO_POINT_GRADS
from .schemes import SCHEMES  # the schemes' arithmetic and names (qvgen.schemes)
from .transforms import TRANSFORMS, uses_rotation, uses_smoothing

# 2: the `scheme` field (version-1 configs have none and are read as "qvgen"); 3: the input-transform
# fields and tensors (`input_signs`, `smooth`) and `zero_point_grad` (older files have none: no transform);
# 4: `act_group_size` and `final_rank` (older files have neither: per-token activations, Φ decayed to 0);
# 5: `layer_act_bits` and the per-layer `input_bits` tensor (older files: one activation width for all layers)
FORMAT_VERSION = 5
QUANT_METHOD = "qvgen"
TRAINING_ONLY_FIELDS = ("smooth_buckets", "learned_rotation")  # not exportable (README, "Timestep-dependent …")


class ConfigError(ValueError):
    """A quantization config (or a field of it) is not what QVGen expects."""


@dataclass
class QVGenConfig:
    """Settings of a QVGen (W4A4 QAT) model.

    Defaults follow the paper: W4A4, Φ rank 32 halved every `phase_steps` (λ = 1/2), per-token
    activation clipping learned per timestep bucket.
    """

    weight_bits: int = 4
    act_bits: int | None = 4
    rank: int = 32
    final_rank: int = 0  # rank Φ decays to and keeps (> 0: shipped as a low-rank branch, e.g. SVDQuant's)
    decay_factor: float = 0.5
    phase_steps: int = 444
    n_buckets: int = 50
    num_train_timesteps: int = 1000
    act_fixed_clip: float = 0.95
    act_clip_init: float = 0.95
    zero_point_grad: str = "ste"  # ste | none: gradient through the activation zero point's rounding
    # None: per-token activation scales; g: one scale/zero point per g consecutive input features of a
    # token (layers whose K is not a multiple of g stay per token); same per-timestep clip factors
    act_group_size: int | None = None
    # fnmatch pattern over module paths -> activation bits of the matching layers, e.g. {"proj_out": 8}:
    # per-layer mixed precision where the error concentrates (`act_bits` elsewhere)
    layer_act_bits: dict[str, int] = field(default_factory=dict)
    modules_to_convert: list[str] = field(default_factory=lambda: ["*"])
    modules_to_not_convert: list[str] = field(default_factory=list)
    current_rank: int | None = None
    input_transform: str = "none"  # none | hadamard | smooth | smooth_hadamard (qvgen/transforms.py)
    hadamard_block: int = 256
    transform_seed: int = 0  # seeds each layer's random draws: Hadamard signs, Φ's randomized SVD init
    smooth_alpha: float = 0.5
    train_transform: bool = False
    # training-only experiments (README, "Timestep-dependent smoothing and learned rotations"; not exportable):
    smooth_buckets: int = 1  # > 1: smoothing scales per this many groups of the timestep buckets
    learned_rotation: int = 0  # b > 0: a learned block-diagonal (b × b) rotation after the Hadamard
    scheme: str = "qvgen"
    format_version: int = FORMAT_VERSION
    quant_method: str = QUANT_METHOD

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the field when a value is out of range."""
        if self.quant_method != QUANT_METHOD:
            raise ConfigError(f"quant_method: expected {QUANT_METHOD!r}, got {self.quant_method!r}")
        if not isinstance(self.format_version, int) or not 1 <= self.format_version <= FORMAT_VERSION:
            raise ConfigError(
                f"format_version: this QVGen reads versions 1..{FORMAT_VERSION}, got {self.format_version!r}; "
                "upgrade qvgen to load this checkpoint"
            )
        _check_int("weight_bits", self.weight_bits, 2, 8)
        if self.act_bits is not None:
            _check_int("act_bits", self.act_bits, 2, 8)
        if self.act_group_size is not None:
            _check_int("act_group_size", self.act_group_size, 2, 65536)
        _check_int("rank", self.rank, 0, 4096)
        _check_int("n_buckets", self.n_buckets, 1, 100_000)
        _check_int("phase_steps", self.phase_steps, 1, 10**9)
        _check_int("num_train_timesteps", self.num_train_timesteps, 1, 10**9)
        _check_int("final_rank", self.final_rank, 0, self.rank)
        if self.current_rank is not None:
            _check_int("current_rank", self.current_rank, 0, self.rank)
        if not 0.0 < self.decay_factor < 1.0:
            raise ConfigError(f"decay_factor: expected a value in (0, 1), got {self.decay_factor!r}")
        for name in ("act_fixed_clip", "act_clip_init"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"{name}: expected a value in (0, 1], got {v!r}")
        if self.zero_point_grad not in ZERO_POINT_GRADS:
            raise ConfigError(
                f"zero_point_grad: expected one of {list(ZERO_POINT_GRADS)}, got {self.zero_point_grad!r}"
            )

        if self.input_transform not in TRANSFORMS:
            raise ConfigError(f"input_transform: expected one of {list(TRANSFORMS)}, got {self.input_transform!r}")
        if self.hadamard_block < 1 or self.hadamard_block & (self.hadamard_block - 1):
            raise ConfigError(f"hadamard_block: expected a power of two, got {self.hadamard_block!r}")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ConfigError(f"smooth_alpha: expected a value in [0, 1], got {self.smooth_alpha!r}")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"scheme: expected one of {list(SCHEMES)}, got {self.scheme!r}")
        if self.act_group_size is not None and not SCHEMES[self.scheme].act_groups:
            raise ConfigError(
                f"act_group_size: scheme {self.scheme!r} has its own activation scaling (per token or per its "
                f"format's blocks); expected None, got {self.act_group_size!r}"
            )
        self._validate_layer_act_bits()
        self._check_learned_transforms()
        why = SCHEMES[self.scheme].check(self)
        if why:
            raise ConfigError(why)
        for name in ("modules_to_convert", "modules_to_not_convert"):
            v = getattr(self, name)
            if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
                raise ConfigError(f"{name}: expected a list of name patterns, got {v!r}")

    def _validate_layer_act_bits(self) -> None:
        v = self.layer_act_bits
        if not isinstance(v, dict) or not all(isinstance(p, str) for p in v):
            raise ConfigError(f"layer_act_bits: expected an object of name pattern -> bits, got {v!r}")
        for pattern, bits in v.items():
            _check_int(f"layer_act_bits[{pattern!r}]", bits, 2, 8)
        if v and not SCHEMES[self.scheme].layer_act_bits:
            raise ConfigError(
                f"layer_act_bits: scheme {self.scheme!r} has one activation width for every layer; expected {{}}, "
                f"got {v!r}"
            )
        if v and self.act_bits is None:
            raise ConfigError(f"layer_act_bits: needs quantized activations (act_bits), got act_bits=None and {v!r}")

    def _check_learned_transforms(self) -> None:
        """`smooth_buckets` and `learned_rotation`: in range, with the transform they extend, `qvgen` scheme only."""
        _check_int("smooth_buckets", self.smooth_buckets, 1, self.n_buckets)
        _check_int("learned_rotation", self.learned_rotation, 0, 4096)
        for name, on in (("smooth_buckets", self.smooth_buckets > 1), ("learned_rotation", self.learned_rotation)):
            if on and not SCHEMES[self.scheme].learned_transforms:
                raise ConfigError(
                    f"{name}: scheme {self.scheme!r} has a fixed input transform; expected the default, "
                    f"got {getattr(self, name)!r}"
                )
        if self.smooth_buckets > 1 and not uses_smoothing(self.input_transform):
            raise ConfigError(
                f"smooth_buckets: timestep-dependent smoothing scales; expected input_transform smooth or "
                f"smooth_hadamard, got {self.input_transform!r}"
            )
        lr = self.learned_rotation
        if lr and (lr < 2 or lr & (lr - 1)):
            raise ConfigError(f"learned_rotation: expected 0 (off) or a power of two ≥ 2, got {lr!r}")
        if lr and not uses_rotation(self.input_transform):
            raise ConfigError(
                f"learned_rotation: starts at the randomised Hadamard; expected input_transform hadamard or "
                f"smooth_hadamard, got {self.input_transform!r}"
            )

    # ---- layer selection -------------------------------------------------------------------
    def should_convert(self, name: str) -> bool:
        """Whether the linear layer at module path `name` is quantized (fnmatch patterns)."""
        if any(fnmatch.fnmatchcase(name, p) for p in self.modules_to_not_convert):
            return False
        return any(fnmatch.fnmatchcase(name, p) for p in self.modules_to_convert)

    def act_bits_of(self, name: str) -> int | None:
        """Activation bits of the layer at module path `name`: its `layer_act_bits` patterns', else `act_bits`."""
        hits = {p: b for p, b in self.layer_act_bits.items() if fnmatch.fnmatchcase(name, p)}
        if len(set(hits.values())) > 1:
            raise ConfigError(f"layer_act_bits: layer {name!r} matches patterns with different bits: {hits}")
        return next(iter(hits.values())) if hits else self.act_bits

    def for_layer(self, name: str) -> QVGenConfig:
        """The config of one layer: this one, or a copy with the layer's own `act_bits` (`layer_act_bits`)."""
        bits = self.act_bits_of(name)
        return self if bits == self.act_bits else dataclasses.replace(self, act_bits=bits, layer_act_bits={})

    @property
    def act_clip_logit_init(self) -> float:
        """Initial clipping logit: sigmoid(logit) = act_clip_init."""
        p = self.act_clip_init
        return math.log(p / (1 - p)) if p < 1 else 12.0

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, except the training-only experiments at their defaults: a checkpoint (which can
        only hold the defaults) then reads in any QVGen of format version 4."""
        data = dataclasses.asdict(self)
        for name in TRAINING_ONLY_FIELDS:
            if data[name] == getattr(QVGenConfig, name):
                del data[name]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "quantization_config") -> QVGenConfig:
        """Build from a dict, rejecting unknown keys so typos and newer formats fail loudly."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown}; known fields are {sorted(known)}")
        try:
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, text: str, *, source: str = "quantization_config") -> QVGenConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=source)


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{name}: expected an integer in [{lo}, {hi}], got {value!r}")
