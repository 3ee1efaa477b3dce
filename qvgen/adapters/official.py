"""Import the QVGen authors' released checkpoints into QVGen's packed format: `python -m qvgen.convert`.

    python -m qvgen.convert Harahan/QVGen-Wan-1_3B-W4A4 ./wan-w4a4/transformer \\
        --base-model Wan-AI/Wan2.1-T2V-1.3B-Diffusers
    python -m qvgen.convert Harahan/QVGen-CogVideoX-2B-W4A4 ./cogvideox-w4a4/transformer --base-model THUDM/CogVideoX-2b

The authors (ModelTC/QVGen, Apache-2.0) release fake-quantization checkpoints: diffusers'
`save_pretrained` of the transformer after every quantized `nn.Linear` became their `QuantLinear`
(`training/quant/quant.py`); their `inference/*.py` read `diffusion_pytorch_model.safetensors`.
Per quantized layer `<n>`:

    <n>.w                         latent full-precision weight (out, in)
    <n>.b                         bias (out,), if the layer has one
    <n>.wquantizer.scale          LSQ+ step size s, (out, 1)
    <n>.wquantizer.zero_point     LSQ+ real zero point z, (out, 1): q = clamp(round(w/s + z), 0, 2^b-1), Ŵ = s(q - z)
    <n>.aquantizer.lower, .upper  clipping logits γ, (T,), T = clip_group_num (50): factor = clip_ratio·sigmoid(γ)
    <n>.wquantizer.L, .R          Φ, only if training stopped before rank 0: ignored, as their inference does
    <n>.loraA.weight, .loraB.weight   QA-LoRA baselines: merged, w + B·A, as their inference does

Layers without `<n>.wquantizer.scale` keep `<n>.weight`/`<n>.bias` and stay in full precision
(`modules_to_not_convert`); every other tensor keeps its diffusers name. The bit widths and the
fixed clip ratio are not in the file: `--weight-bits`, `--act-bits`, `--clip-ratio` (defaults 4, 4,
0.95 are the released W4A4 settings).

Clipping pairs and timesteps: their training picks pair `int(t) % T` at timestep t (T =
`clip_group_num`, 50); their inference (`--fix`) counts down one pair per transformer call from
T-1, which matches training only for T evenly spaced sampling steps and one call per step. QVGen
picks a bucket by timestep value, bucket = floor(t · n_buckets / 1000). `--clip-buckets`:

- `mod` (default): 1000 buckets, bucket t holding pair `t mod T`: exactly their training rule, under
  any sampler, step count and CFG (Wan's two calls per step under CFG read the same pair);
- `identity`: T buckets, pair b in bucket b (timesteps [20b, 20b + 20) for T = 50): their inference
  countdown for T evenly spaced steps with one call per step (CogVideoX-2B with 50 DDIM steps);
  with Wan's uneven flow-matching timesteps it matches the trained pair at few steps;
- `mean`: one bucket, the average of the T pairs: the same factors at every timestep.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..checkpoint import (
    CONFIG_NAME,
    META_MODEL_CONFIG,
    META_QCONFIG,
    Checkpoint,
    CheckpointError,
    indexed_shards,
    load_checkpoint,
    load_into,
    read_safetensors,
    save_packed,
)
from ..config import ConfigError, QVGenConfig
from ..hub_errors import reaching
from ..packed_layer import assemble
from ..quantizers import quantize_weight_int
from ..surgery import build_packed_model
from .diffusers_models import empty_model

PROVENANCE = "qvgen_provenance.json"
W, B = ".w", ".b"
W_SCALE, W_ZERO = ".wquantizer.scale", ".wquantizer.zero_point"
A_LOWER, A_UPPER = ".aquantizer.lower", ".aquantizer.upper"
LORA_A, LORA_B = ".loraA.weight", ".loraB.weight"
IGNORED = (".wquantizer.L", ".wquantizer.R", ".wquantizer.ps", ".aquantizer.ps")
SOURCE_PATTERNS = [
    "config.json",
    "diffusion_pytorch_model*.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model*.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
]
NUM_TRAIN_TIMESTEPS = 1000  # Wan and CogVideoX train on integer timesteps 0..999
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class ConversionResult:
    output: Path
    config: QVGenConfig
    quantized: list[str] = field(default_factory=list)
    full_precision: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    merged_lora: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"QVGen: wrote {self.output}",
            f"  quantized layers: {len(self.quantized)} (W{self.config.weight_bits}A{self.config.act_bits or 16}, "
            f"{self.config.n_buckets} clipping bucket(s))",
            f"  kept in full precision: {len(self.full_precision)}"
            + (f" {self.full_precision}" if self.full_precision else ""),
        ]
        if self.merged_lora:
            lines.append(f"  QA-LoRA branches merged: {len(self.merged_lora)}")
        if self.ignored:
            lines.append(f"  ignored tensors: {len(self.ignored)} (e.g. {self.ignored[0]})")
        return "\n".join(lines)


# ---- reading the source ------------------------------------------------------------------------------
def resolve_source(source: str | os.PathLike, revision: str | None = None) -> tuple[list[Path], Path | None, str]:
    """Weight files, the config.json next to them (if any) and a label, for a local file or folder or a Hub repo."""
    path = Path(source)
    if path.is_file():
        cfg = path.parent / CONFIG_NAME
        return [path], cfg if cfg.is_file() else None, str(path)
    if not path.is_dir():
        if path.suffix == ".safetensors" or str(source).startswith((".", "/")):
            raise CheckpointError(f"{source}: no such file or folder")
        from huggingface_hub import snapshot_download

        with reaching(str(source), CheckpointError):
            path = Path(snapshot_download(str(source), revision=revision, allow_patterns=SOURCE_PATTERNS))
    for folder in (path, path / "transformer"):
        files = indexed_shards(folder)
        if files is None:
            files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
        if files:
            cfg = folder / CONFIG_NAME
            return files, cfg if cfg.is_file() else None, str(source)
    raise CheckpointError(
        f"{source}: no diffusion_pytorch_model*.safetensors (looked in {path} and {path}/transformer)"
    )


def refuse_overwriting(sources: list[Path], output: Path) -> None:
    """Writing `output` replaces it whole (atomically): refuse when that would replace a source file."""
    out = output.resolve()
    for f in sources:
        f = f.resolve()
        if out == f or out in f.parents:
            raise CheckpointError(f"{output}: writing it would replace the source {f}; choose another output path")


def base_model_config(base_model: str, revision: str | None = None) -> dict[str, Any]:
    """The diffusers transformer config of the base model (a pipeline or transformer folder, or a Hub id)."""
    local = Path(base_model)
    for cand in (local / "transformer" / CONFIG_NAME, local / CONFIG_NAME):
        if cand.is_file():
            return _json(cand)
    if local.exists():
        raise CheckpointError(f"{base_model}: no transformer/config.json or config.json")
    from huggingface_hub import hf_hub_download

    with reaching(f"--base-model {base_model}", CheckpointError):
        return _json(Path(hf_hub_download(base_model, "transformer/config.json", revision=revision)))


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


# ---- conversion ----------------------------------------------------------------------------------------
CLIP_BUCKETS = ("mod", "identity", "mean")


def convert_state_dict(
    state: dict[str, Tensor],
    src: str,
    *,
    linears: set[str] | None = None,
    weight_bits: int = 4,
    act_bits: int | None = 4,
    clip_ratio: float = 0.95,
    clip_buckets: str = "mod",
    result: ConversionResult | None = None,
) -> tuple[dict[str, Tensor], QVGenConfig]:
    """The packed tensors (diffusers names) and config of an authors' state dict; needs no diffusers.

    `linears`: the model's linear layers (from its skeleton); without it, every module with a 2-D
    `weight` counts as one (true of Wan and CogVideoX, which have no embedding tables).
    `state` is consumed: the tensors of quantized layers are popped from it.
    """
    if clip_buckets not in CLIP_BUCKETS:
        raise ValueError(f"clip_buckets: expected one of {list(CLIP_BUCKETS)}, got {clip_buckets!r}")
    result = result if result is not None else ConversionResult(Path(src), QVGenConfig())
    layers = sorted(k[: -len(W_SCALE)] for k in state if k.endswith(W_SCALE))
    if not layers:
        raise CheckpointError(
            f"{src}: no '<layer>{W_SCALE}' tensors, so not a QVGen fake-quantization checkpoint "
            "(for a QVGen packed checkpoint, load it directly)"
        )
    if linears is None:
        quantized = set(layers)
        linears = {k[: -len(".weight")] for k, t in state.items() if k.endswith(".weight") and t.dim() == 2}
        linears = {n for n in linears if n.rpartition(".")[0] not in quantized} | quantized  # not loraA/B
    n_pairs = _clip_pairs(state, layers, src)
    if clip_buckets == "mean" or n_pairs == 0 or act_bits is None:
        n_buckets = 1
    else:
        n_buckets = NUM_TRAIN_TIMESTEPS if clip_buckets == "mod" else n_pairs
    full_precision = sorted(linears - set(layers))
    try:
        config = QVGenConfig(
            weight_bits=weight_bits,
            act_bits=act_bits,
            rank=0,
            current_rank=0,
            n_buckets=n_buckets,
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            act_fixed_clip=clip_ratio,
            act_clip_init=clip_ratio,
            modules_to_not_convert=full_precision,
        )
    except ConfigError as e:
        raise CheckpointError(f"settings: {e}") from None
    result.config, result.quantized, result.full_precision = config, layers, full_precision
    packed: dict[str, Tensor] = {}
    for n in layers:
        packed.update(_convert_layer(state, n, config, clip_ratio, clip_buckets, src, result))
    for k in list(state):
        if k.endswith(IGNORED) or ".wquantizer." in k or ".aquantizer." in k:
            result.ignored.append(k)
            del state[k]
    packed.update(state)  # everything else keeps its diffusers name
    return packed, config


def convert_official(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    base_model: str | None = None,
    revision: str | None = None,
    base_revision: str | None = None,
    weight_bits: int = 4,
    act_bits: int | None = 4,
    clip_ratio: float = 0.95,
    clip_buckets: str = "mod",
    dtype: torch.dtype | None = torch.bfloat16,
) -> ConversionResult:
    """Convert an authors' checkpoint to a QVGen checkpoint at `output` (folder, or `.safetensors` file)."""
    if clip_buckets not in CLIP_BUCKETS:
        raise ValueError(f"clip_buckets: expected one of {list(CLIP_BUCKETS)}, got {clip_buckets!r}")
    files, cfg_file, label = resolve_source(source, revision)
    refuse_overwriting(files, Path(output))
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(read_safetensors(f)[0])
    src_name = str(files[0] if len(files) == 1 else files[0].parent)
    model_config = _json(cfg_file) if cfg_file is not None else None
    if model_config is not None and "quantization_config" in model_config:
        raise CheckpointError(f"{cfg_file}: already has a quantization_config; this is not an authors' checkpoint")
    if model_config is None or "_class_name" not in model_config:
        if base_model is None:
            raise CheckpointError(f"{src_name}: no config.json with the model class next to it; pass --base-model")
        model_config = base_model_config(base_model, base_revision)
    model = empty_model(model_config, src_name)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for n in sorted(k[: -len(W_SCALE)] for k in state if k.endswith(W_SCALE)):
        if n not in linears:
            raise CheckpointError(
                f"{src_name}: '{n}{W_SCALE}' belongs to no linear layer of {model_config['_class_name']} "
                "(wrong --base-model?)"
            )
    result = ConversionResult(Path(output), QVGenConfig())
    packed, config = convert_state_dict(
        state,
        src_name,
        linears=linears,
        weight_bits=weight_bits,
        act_bits=act_bits,
        clip_ratio=clip_ratio,
        clip_buckets=clip_buckets,
        result=result,
    )
    build_packed_model(model, config, dtype=torch.float32, device="meta")
    load_into(model, Checkpoint(config, model_config, packed), src_name)
    cfg = {k: v for k, v in model_config.items() if k != "quantization_config"}
    out = save_packed(model, config, output, model_config=cfg, dtype=dtype)
    load_checkpoint(out)  # what was written reads back and validates
    if out.is_dir():
        provenance = {
            "method": "converted",
            "source": label,
            "source_revision": revision,
            "base_model": base_model,
            "clip_buckets": clip_buckets,
            "clip_ratio": clip_ratio,
        }
        (out / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    return result


def convert_to_file(
    source: str | os.PathLike, output: Path, *, clip_buckets: str = "mod", dtype: torch.dtype = torch.bfloat16
) -> ConversionResult:
    """An authors' folder or file (with its config.json) as one QVGen `.safetensors` file, without
    diffusers (what the ComfyUI loader runs): the same tensors as `convert_official`, written
    atomically and read back through `load_checkpoint`."""
    files, cfg_file, _ = resolve_source(source)
    if cfg_file is None:
        raise CheckpointError(f"{source}: no config.json next to the weights (the model's diffusers config)")
    model_config = _json(cfg_file)
    if "quantization_config" in model_config:
        raise CheckpointError(f"{cfg_file}: already has a quantization_config; this is not an authors' checkpoint")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(read_safetensors(f)[0])
    src_name = str(files[0] if len(files) == 1 else files[0].parent)
    result = ConversionResult(output, QVGenConfig())
    packed, config = convert_state_dict(state, src_name, clip_buckets=clip_buckets, result=result)
    quantized = set(result.quantized)
    for k, t in packed.items():
        if t.is_floating_point() and k.rpartition(".")[0] not in quantized:
            packed[k] = t.to(dtype).contiguous()
    meta = {
        META_QCONFIG: config.to_json(),
        META_MODEL_CONFIG: json.dumps(model_config),
        "format": "pt",
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        save_file(packed, str(tmp), metadata=meta)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    load_checkpoint(output)
    return result


def _clip_pairs(state: dict[str, Tensor], layers: list[str], src: str) -> int:
    """Number of clipping pairs per layer (0 when the activation quantizer had none), the same for all."""
    counts = set()
    for n in layers:
        lo, hi = state.get(n + A_LOWER), state.get(n + A_UPPER)
        if (lo is None) != (hi is None):
            raise CheckpointError(f"{src}: layer '{n}': '{A_LOWER[1:]}' and '{A_UPPER[1:]}' must come together")
        if lo is not None and (lo.dim() != 1 or lo.shape != hi.shape):
            raise CheckpointError(
                f"{src}: tensor '{n}{A_LOWER}': expected shape (T,) equal to '{A_UPPER[1:]}', "
                f"got {tuple(lo.shape)} and {tuple(hi.shape)}"
            )
        counts.add(0 if lo is None else lo.shape[0])
    if len(counts) > 1:
        raise CheckpointError(f"{src}: layers disagree on the number of activation clipping pairs: {sorted(counts)}")
    return counts.pop()


def _need(state: dict[str, Tensor], key: str, src: str, what: str) -> Tensor:
    t = state.pop(key, None)
    if t is None:
        raise CheckpointError(f"{src}: tensor '{key}': expected {what}, got nothing (missing)")
    return t


@torch.no_grad()
def _convert_layer(
    state: dict[str, Tensor],
    n: str,
    config: QVGenConfig,
    clip_ratio: float,
    clip_buckets: str,
    src: str,
    result: ConversionResult,
) -> dict[str, Tensor]:
    w = _need(state, n + W, src, "the latent weight (out, in)").float()
    if w.dim() != 2:
        raise CheckpointError(f"{src}: tensor '{n}{W}': expected a 2-D weight, got shape {tuple(w.shape)}")
    out_f = w.shape[0]
    a, b = state.pop(n + LORA_A, None), state.pop(n + LORA_B, None)
    if (a is None) != (b is None):
        raise CheckpointError(f"{src}: layer '{n}': '{LORA_A[1:]}' and '{LORA_B[1:]}' must come together")
    if a is not None:
        w = w + b.float() @ a.float()
        result.merged_lora.append(n)
    s = _need(state, n + W_SCALE, src, f"shape ({out_f}, 1)").float()
    z = _need(state, n + W_ZERO, src, f"shape ({out_f}, 1)").float()
    for key, t in ((W_SCALE, s), (W_ZERO, z)):
        if t.numel() != out_f or t.dim() > 2:
            raise CheckpointError(f"{src}: tensor '{n}{key}': expected shape ({out_f}, 1), got {tuple(t.shape)}")
    s, z = s.reshape(out_f, 1), z.reshape(out_f, 1)
    q = quantize_weight_int(w, s, z, config.weight_bits)  # clamp(round(w/s + z)): their LSQ+ rounding
    bias = state.pop(n + B, None)
    if bias is not None and bias.shape != (out_f,):
        raise CheckpointError(f"{src}: tensor '{n}{B}': expected shape ({out_f},), got {tuple(bias.shape)}")
    lo, hi = state.pop(n + A_LOWER, None), state.pop(n + A_UPPER, None)
    factors = None
    if config.act_bits is not None:
        if lo is None:
            factors = torch.full((1, 2), clip_ratio)
        else:
            factors = clip_ratio * torch.sigmoid(torch.stack([lo.float(), hi.float()], dim=1))  # (T, 2)
        if config.n_buckets == 1:
            factors = factors.mean(dim=0, keepdim=True)
        elif clip_buckets == "mod":  # one bucket per training timestep t, holding pair t mod T
            factors = factors[torch.arange(config.n_buckets) % factors.shape[0]]
    tensors = assemble(q, s, z, config.weight_bits, act_clip=factors, bias=bias)
    return {f"{n}.{k}": t for k, t in tensors.items()}


# ---- CLI ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qvgen.convert",
        description="Convert the QVGen authors' fake-quantization checkpoints into QVGen's packed format.",
        epilog="The layout assumed is documented in qvgen/adapters/official.py.",
    )
    p.add_argument("source", help="Hub repo id (e.g. Harahan/QVGen-Wan-1_3B-W4A4), folder or .safetensors file")
    p.add_argument("output", help="output folder (diffusers model folder) or a .safetensors file (single file)")
    p.add_argument("--base-model", help="full-precision model (Hub id or folder), for the transformer config")
    p.add_argument("--revision", default=None, help="revision of the source repo to pin")
    p.add_argument("--base-revision", default=None)
    p.add_argument("--weight-bits", type=int, default=4)
    p.add_argument("--act-bits", type=int, default=4, help="0: weights only")
    p.add_argument("--clip-ratio", type=float, default=0.95, help="their fixed activation clip ratio")
    p.add_argument(
        "--clip-buckets",
        choices=list(CLIP_BUCKETS),
        default="mod",
        help="mod: pair t mod T at timestep t, as the authors trained (any sampler); identity: pair b for the b-th "
        "of T equal timestep ranges (their inference countdown for T evenly spaced steps); mean: one averaged pair",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="dtype of the full-precision tensors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = convert_official(
            args.source,
            args.output,
            base_model=args.base_model,
            revision=args.revision,
            base_revision=args.base_revision,
            weight_bits=args.weight_bits,
            act_bits=args.act_bits or None,
            clip_ratio=args.clip_ratio,
            clip_buckets=args.clip_buckets,
            dtype=DTYPES[args.dtype],
        )
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
