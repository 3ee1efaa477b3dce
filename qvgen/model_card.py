"""The Hub model card (README.md) of a QVGen checkpoint.

Everything on the card is read from what is uploaded: the `quantization_config`, the training
run's `train_config.json` / `train_log.jsonl`, a metrics file, and the base model's own card
(its license is carried over). Rendering is pure (no network), so tests check the exact text.

The card is a `huggingface_hub.ModelCard`: the metadata is a `ModelCardData` (the Hub's field names
and YAML), joined to the body by `ModelCard.from_template`, which also parses the result back, so
a card with broken metadata is an error here rather than on the Hub. The body stays our own Markdown:
what it says (bits, Φ, buckets, how to load in diffusers and ComfyUI) is QVGen's, and no Hub template
has those sections.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .config import QVGenConfig

# schemes shipped in ComfyUI's own format: (weights, activations, format) rows of the card
COMFY_NATIVE = {
    "convrot_w4a4": (
        "4-bit integers of the Hadamard-256-rotated weight, per output row, symmetric, learned scale",
        "int4 per token (int8 on GPUs without int4 tensor cores, or when the file asks for it)",
        "ComfyUI-native `convrot_w4a4` (comfy-kitchen `TensorCoreConvRotW4A4Layout`)",
    ),
    "nvfp4": (
        "FP4 (e2m1) with an fp8 scale per 16 inputs and a global scale; learned block clips",
        "FP4 per 16-element block with a learned static global scale (`input_scale`), on GPUs with FP4 "
        "tensor cores (RTX 50, B200); other devices run the layers with unquantized inputs",
        "ComfyUI-native `nvfp4` (comfy-kitchen `TensorCoreNVFP4Layout`)",
    ),
    "svdquant_w4a4": (
        "4-bit integers, signed, learned scale per group of 64 inputs, after learned SmoothQuant smoothing",
        "4-bit per token and group of 64, dynamic absmax",
        "ComfyUI-native `svdquant_w4a4` (comfy-kitchen `TensorCoreSVDQuantW4A4Layout`); needs a ComfyUI that "
        "registers it (not 0.29)",
    ),
    "w4a8_int8": (
        "4-bit codes into comfy-kitchen's 16-level codebook, fp8 scale per group of 16 and fp32 scale per row "
        "(both learned), ConvRot rotated",
        "8-bit per token, dynamic absmax, same rotation",
        "ComfyUI-native `asym_w4a8_int8` (comfy-kitchen `AsymW4A8Int8Layout`), ComfyUI >= 0.31",
    ),
}

PIPELINE_FOR_TRANSFORMER = {
    "WanTransformer3DModel": "WanPipeline",
    "CogVideoXTransformer3DModel": "CogVideoXPipeline",
}
METHODS = {
    "qat": "trained with QVGen quantization-aware training (distillation from the full-precision model, "
    "auxiliary module Φ decayed to rank 0)",
    "ptq": "quantized with round-to-nearest post-training quantization (no training; expect visibly lower "
    "quality than a QVGen QAT checkpoint)",
    "converted": "converted from the QVGen authors' released fake-quantization checkpoint",
    "unknown": "quantized with QVGen",
}
TRAINING_KEYS = (
    ("steps", "steps"),
    ("batch_size", "batch size (per device)"),
    ("grad_accum", "gradient accumulation"),
    ("lr", "learning rate (weights, Φ, quantizer scales)"),
    ("clip_lr", "learning rate (activation clipping)"),
    ("weight_decay", "weight decay"),
    ("betas", "AdamW betas"),
    ("warmup_steps", "warm-up steps"),
    ("grad_clip", "gradient-norm clip"),
    ("caption_dropout", "caption dropout"),
    ("mixed_precision", "mixed precision"),
    ("seed", "seed"),
)
PAPER = "https://arxiv.org/abs/2505.11497"
PROJECT = "https://github.com/qvgen/qvgen"
# `ModelCard.from_template` renders `card_data` as the YAML header; the body is written by `_body`.
TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}"
CITATION = """```bibtex
@inproceedings{huang2026qvgen,
  title={QVGen: Pushing the Limit of Quantized Video Generative Models},
  author={Huang, Yushi and Gong, Ruihao and Liu, Jing and Ding, Yifu and Lv, Chengtao and Qin, Haotong and Zhang, Jun},
  booktitle={International Conference on Learning Representations},
  year={2026}
}
```
"""


@dataclass
class CardInfo:
    """What the card says; `hub.stage_upload` fills it from the files being uploaded."""

    repo_id: str
    base_model: str  # Hub id, or a local folder when the base was not loaded from the Hub
    config: QVGenConfig
    transformer_class: str = "WanTransformer3DModel"
    pipeline_class: str | None = None
    method: str = "qat"
    source: str | None = None  # converted checkpoints: where they came from
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    full_pipeline: bool = True
    single_file: str | None = None  # path in the repo of the ComfyUI file
    diffusers_folder: bool = False  # a ComfyUI-native repo also holds `transformer/` (the same tensors for diffusers)
    training: dict[str, Any] | None = None  # train_config.json
    final_log: dict[str, Any] | None = None  # last line of train_log.jsonl
    metrics: dict[str, Any] | None = None
    sizes: dict[str, int] = field(default_factory=dict)  # label -> bytes
    extra_tags: list[str] = field(default_factory=list)

    @property
    def pipeline(self) -> str:
        return self.pipeline_class or PIPELINE_FOR_TRANSFORMER.get(self.transformer_class, "DiffusionPipeline")

    @property
    def bits(self) -> str:
        a = self.config.act_bits if self.config.act_bits is not None else 16
        return f"W{self.config.weight_bits}A{a}"


def is_hub_id(name: str) -> bool:
    """`org/name` as the Hub spells repo ids (a local path is not one, even when it exists)."""
    import re
    from pathlib import Path

    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).exists()


def render_model_card(info: CardInfo) -> ModelCard:
    """The README.md as a `ModelCard`: YAML metadata, then the body (`card.save(path)` writes it)."""

    family = "cogvideox" if "CogVideoX" in info.transformer_class else "wan"
    data = ModelCardData(
        base_model=info.base_model if is_hub_id(info.base_model) else None,
        library_name="diffusers",
        pipeline_tag="text-to-video",
        license=info.license,
        license_name=info.license_name,
        license_link=info.license_link,
        tags=["qvgen", "quantized", info.bits.lower(), family, "text-to-video", *info.extra_tags],
        base_model_relation="quantized",
    )
    return ModelCard.from_template(data, template_str=TEMPLATE, body=_body(info))


def _body(info: CardInfo) -> str:
    c = info.config
    name = info.repo_id.split("/")[-1]
    base_link = (
        f"[{info.base_model}](https://huggingface.co/{info.base_model})"
        if is_hub_id(info.base_model)
        else f"`{info.base_model}`"
    )
    if c.scheme in COMFY_NATIVE:
        return _comfy_native_body(info, name, base_link)
    parts = [
        f"# {name}\n",
        f"{info.bits} version of {base_link}, {METHODS.get(info.method, info.method)}"
        + (f" (`{info.source}`)" if info.source else "")
        + f". Made with [QVGen]({PROJECT}) ([paper]({PAPER})).\n",
        "## Quantization\n",
        _table(
            [
                (
                    "weights",
                    f"{c.weight_bits}-bit integers, per output channel, asymmetric, learned scale and zero point",
                ),
                (
                    "activations",
                    "16-bit (not quantized)"
                    if c.act_bits is None
                    else f"{c.act_bits}-bit, {_act_granularity(c.act_group_size)}, dynamic, asymmetric, "
                    "learned clipping "
                    f"({c.n_buckets} timestep bucket{'s' if c.n_buckets != 1 else ''})" + _layer_widths(c),
                ),
                ("quantized layers", _patterns(c.modules_to_convert)),
                ("kept in full precision", _patterns(c.modules_to_not_convert) if c.modules_to_not_convert else "none"),
                (
                    "auxiliary module Φ",
                    f"rank {c.current_rank or 0} (removed)" if not c.current_rank else f"rank {c.current_rank}",
                ),
                ("input transform", c.input_transform) if getattr(c, "input_transform", "none") != "none" else None,
                ("format", f'QVGen checkpoint format v{c.format_version} (safetensors; `quant_method: "qvgen"`)'),
                *[(label, _size(n)) for label, n in info.sizes.items()],
            ]
        ),
    ]
    parts += ["## Training\n", _training(info)]
    parts += ["## Metrics\n", _metrics(info.metrics)]
    parts += ["## Use with diffusers\n", _diffusers_usage(info)]
    parts += ["## Use in ComfyUI\n", _comfyui_usage(info)]
    parts += ["## License\n", _license(info)]
    parts += [
        "## Citation\n",
        CITATION,
    ]
    return "\n".join(parts)


def _comfy_native_body(info: CardInfo, name: str, base_link: str) -> str:
    """The card of a model shipped as one ComfyUI-native file (and, from a training run, its diffusers folder)."""
    c = info.config
    weights, acts, fmt = COMFY_NATIVE[c.scheme]
    rows = [("weights", weights), ("activations", acts), ("quantized layers", _patterns(c.modules_to_convert))]
    rows += [("kept in full precision", _patterns(c.modules_to_not_convert) if c.modules_to_not_convert else "none")]
    phi = (
        f"rank {c.current_rank}, kept as the layer's low-rank branch (`proj_down` / `proj_up`)"
        if c.current_rank
        else "decayed to rank 0 during training (removed)"
    )
    rows += [("auxiliary module Φ", phi), ("format", fmt)]
    rows += [(label, _size(n)) for label, n in info.sizes.items()]
    fname = info.single_file.split("/")[-1]
    parts = [
        f"# {name}\n",
        f"{info.bits} ({c.scheme}) version of {base_link}, {METHODS.get(info.method, info.method)}. "
        f"Made with [QVGen]({PROJECT}) ([paper]({PAPER})).\n",
        "## Quantization\n",
        _table(rows),
        "## Training\n",
        _training(info),
        "## Metrics\n",
        _metrics(info.metrics),
        "## Use in ComfyUI\n",
        f"Download `{info.single_file}` into `ComfyUI/models/diffusion_models/` "
        f"(`python -m qvgen.hub pull {info.repo_id} --what comfyui --local-dir ComfyUI/models/diffusion_models`) "
        f"and pick `{fname}` in ComfyUI's stock **Load Diffusion Model** node; no custom node is needed.\n",
        "## Use in PyTorch\n",
        "```python\nimport qvgen\nfrom huggingface_hub import hf_hub_download\n\n"
        f'transformer = qvgen.load_quantized_model(hf_hub_download("{info.repo_id}", "{info.single_file}"))\n```\n\n'
        "QVGen's loader runs the layers in PyTorch (dequantized weights, the format's input quantization).\n",
        *(["## Use with diffusers\n", _diffusers_usage(info)] if info.diffusers_folder else []),
        "## License\n",
        _license(info),
        "## Citation\n",
        CITATION,
    ]
    return "\n".join(parts)


def _training(info: CardInfo) -> str:
    if info.method == "ptq":
        return "None: round-to-nearest post-training quantization.\n"
    if not info.training:
        if info.method == "converted":
            return "See the source checkpoint's card; the QVGen paper describes the recipe.\n"
        return "No training record was uploaded with this checkpoint.\n"
    opts = info.training.get("options", {})
    q = info.training.get("quantization", {})
    rows: list[tuple[str, str] | None] = [
        (label, _fmt(opts[k])) for k, label in TRAINING_KEYS if opts.get(k) is not None
    ]
    if q:
        rows.append(
            ("Φ rank schedule", f"{q.get('rank')} → 0, ×{q.get('decay_factor')} every {q.get('phase_steps')} steps")
        )
    if info.final_log:
        rows.append(("final distillation loss", _fmt(info.final_log.get("loss"))))
    return _table(rows)


def _metrics(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "No evaluation metrics were recorded for this checkpoint.\n"
    flat = _flatten(metrics)
    return _table([(k, _fmt(v)) for k, v in flat.items()], header=("metric", "value"))


def _diffusers_usage(info: CardInfo) -> str:
    dtype = "torch.bfloat16"
    if info.full_pipeline:
        code = (
            'import torch\nimport qvgen  # registers quant_method "qvgen" with diffusers\n'
            "from diffusers import DiffusionPipeline\nfrom diffusers.utils import export_to_video\n\n"
            f'pipe = DiffusionPipeline.from_pretrained("{info.repo_id}", torch_dtype={dtype}).to("cuda")\n'
        )
    else:
        code = (
            'import torch\nimport qvgen  # registers quant_method "qvgen" with diffusers\n'
            f"from diffusers import {info.pipeline}, {info.transformer_class}\n"
            "from diffusers.utils import export_to_video\n\n"
            f"transformer = {info.transformer_class}.from_pretrained(\n"
            f'    "{info.repo_id}", subfolder="transformer", torch_dtype={dtype}\n)\n'
            f'pipe = {info.pipeline}.from_pretrained("{info.base_model}", transformer=transformer, '
            f'torch_dtype={dtype}).to("cuda")\n'
        )
    code += 'video = pipe("a red fox running through snow", num_inference_steps=50).frames[0]\n'
    code += 'export_to_video(video, "fox.mp4", fps=16)\n'
    return (
        "```bash\npip install qvgen diffusers transformers accelerate\n```\n\n"
        f"```python\n{code}```\n\n"
        "Only the transformer is quantized; the quantized layers are built directly from the packed "
        "weights (no full-precision copy is materialised). `python -m qvgen.hub pull "
        f"{info.repo_id}` downloads the files ahead of time (add `--revision <commit>` to pin a version; "
        "`HF_HUB_OFFLINE=1` then serves them from the cache).\n"
    )


def _comfyui_usage(info: CardInfo) -> str:
    if not info.single_file:
        return (
            "This repo has no single-file copy; `qvgen.hub.write_single_file(qvgen.load_checkpoint(folder), path)` "
            "makes one from the downloaded `transformer/` folder for the QVGen loader node.\n"
        )
    fname = info.single_file.split("/")[-1]
    return (
        "1. Install the QVGen node pack (ComfyUI-Manager: search *QVGen*, or `git clone` the QVGen repository "
        "into `ComfyUI/custom_nodes/` and `pip install -e .` in it).\n"
        f"2. Download `{info.single_file}` into `ComfyUI/models/diffusion_models/` (ComfyUI lists sub-folders):\n"
        f"   `python -m qvgen.hub pull {info.repo_id} --what comfyui --local-dir ComfyUI/models/diffusion_models`\n"
        f"3. In a standard {'CogVideoX' if 'CogVideoX' in info.transformer_class else 'Wan 2.1'} workflow, replace "
        f"the model loader with the QVGen loader node and pick `{fname}`; text encoder and VAE are the base "
        "model's usual files.\n"
    )


def _license(info: CardInfo) -> str:
    if info.license is None:
        return (
            f"Not stated on the base model's card: the license of {info.base_model} applies to these weights; "
            "check it before use.\n"
        )
    name = info.license_name or info.license
    link = f" ({info.license_link})" if info.license_link else ""
    return (
        f"Derived from {info.base_model}, so its license carries over: **{name}**{link}. QVGen's code is Apache-2.0.\n"
    )


# ---- small helpers -------------------------------------------------------------------------------
def _table(rows: list[tuple[str, str] | None], header: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {v} |" for row in rows if row is not None for k, v in [row]]
    return "\n".join(lines) + "\n"


def _layer_widths(c: QVGenConfig) -> str:
    """The per-layer activation widths of a mixed-precision model (`layer_act_bits`), '' when there are none."""
    if not c.layer_act_bits:
        return ""
    by_bits: dict[int, list[str]] = {}
    for pattern, bits in c.layer_act_bits.items():
        by_bits.setdefault(bits, []).append(pattern)
    return "; " + "; ".join(f"{bits}-bit on {_patterns(p)}" for bits, p in sorted(by_bits.items()))


def _patterns(patterns: list[str]) -> str:
    if patterns == ["*"]:
        return "every linear layer of the transformer"
    return ", ".join(f"`{p}`" for p in patterns)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, (dict,)):
        return json.dumps(v)
    return str(v)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + " / "))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def _act_granularity(group_size: int | None) -> str:
    return "per token" if group_size is None else f"per group of {group_size} input features of a token"
