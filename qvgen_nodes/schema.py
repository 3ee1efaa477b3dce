"""The nodes' inputs and outputs as plain data (no ComfyUI import).

`v3.py` turns these into ComfyUI V3 `io.Schema`s; the workflow check (`workflow_check.py`) and the
tests read them directly, so a workflow using QVGen nodes can be checked without ComfyUI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CATEGORY = "QVGen"
NO_LOCAL = "none (use repo_id)"
BACKENDS = ["auto", "triton", "cpu", "torch"]
DTYPES = ["default", "bf16", "fp16", "fp32"]
WEIGHT_BITS = ["2", "3", "4", "5", "6", "8"]
ACT_BITS = ["2", "3", "4", "5", "6", "8", "none"]


@dataclass(frozen=True)
class Input:
    name: str
    type: str  # COMBO | STRING | BOOLEAN | INT | MODEL
    tooltip: str
    default: Any = None
    options: list[str] | Callable[[], list[str]] | None = None
    optional: bool = False

    @property
    def is_widget(self) -> bool:
        return self.type in ("COMBO", "STRING", "BOOLEAN", "INT", "FLOAT")

    def option_list(self) -> list[str]:
        return list(self.options() if callable(self.options) else (self.options or []))


@dataclass(frozen=True)
class Output:
    type: str
    name: str
    tooltip: str


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: list[Input]
    outputs: list[Output]
    category: str = CATEGORY
    search_aliases: list[str] = field(default_factory=list)

    def input(self, name: str) -> Input:
        return next(i for i in self.inputs if i.name == name)


def _checkpoint_options() -> list[str]:
    from .loader import checkpoint_options

    return checkpoint_options()


LOADER = NodeSpec(
    node_id="QVGenLoader",
    display_name="Load QVGen Model (Wan W4A4, 4-bit)",
    description=(
        "Loads a QVGen W4A4 (4-bit weights and activations, quantized by quantization-aware training) Wan 2.1 "
        "diffusion model and returns a standard "
        "MODEL: ComfyUI's own Wan model with QVGen's packed layers, so ModelSamplingSD3, KSampler, LoRA loaders "
        "and memory management (offload, --lowvram) work as with UNETLoader. Pick a checkpoint from "
        "models/diffusion_models, or type a Hugging Face repo id to download one there (used offline once "
        "downloaded); the paper authors' checkpoints (Harahan/QVGen-Wan-1_3B-W4A4) are converted once."
    ),
    inputs=[
        Input(
            "checkpoint",
            "COMBO",
            "A QVGen checkpoint in models/diffusion_models: a single .safetensors file, or a diffusers folder "
            f"(ends in '/'). Ignored when repo_id is set; '{NO_LOCAL}' when you use repo_id.",
            options=_checkpoint_options,
        ),
        Input(
            "repo_id",
            "STRING",
            "Hugging Face repo id (owner/name) of a QVGen model: one pushed with qvgen.hub, or the paper "
            "authors' Harahan/QVGen-Wan-1_3B-W4A4 (converted once to the packed format). Also a local path to a "
            "checkpoint in the authors' layout. Files go to models/diffusion_models/qvgen/; without network the "
            "earlier download is used. Leave empty to use 'checkpoint'.",
            default="",
            optional=True,
        ),
        Input(
            "revision",
            "STRING",
            "Branch, tag or commit of repo_id (empty: main). Pin a commit for reproducible results.",
            default="",
            optional=True,
        ),
        Input(
            "backend",
            "COMBO",
            "Kernels for the 4-bit matmuls: auto (Triton on a CUDA GPU when installed, else the PyTorch int8 "
            "path), triton (fused GPU kernels), cpu (PyTorch int8 path, any device), torch (exact reference, slow).",
            default="auto",
            options=BACKENDS,
            optional=True,
        ),
        Input(
            "compute_dtype",
            "COMBO",
            "Dtype of the activations and of the layers kept in full precision (norms, patch embedding); "
            "default lets ComfyUI choose for your device.",
            default="default",
            options=DTYPES,
            optional=True,
        ),
    ],
    outputs=[Output("MODEL", "MODEL", "The W4A4 diffusion model, usable wherever a MODEL is expected.")],
    search_aliases=["w4a4", "4-bit", "4bit", "int4", "quantized wan", "quantize", "wan 2.1", "qvgen"],
)

QUANTIZE = NodeSpec(
    node_id="QVGenQuantize",
    display_name="QVGen Quantize Wan (RTN W4A4, 4-bit)",
    description=(
        "Round-to-nearest low-bit quantization (W4A4, 4-bit weights and activations, by default) of any loaded "
        "Wan MODEL, with QVGen's packed layers and kernels: a quick preview of low-bit quality without a QVGen "
        "checkpoint. A QVGen-trained checkpoint (Load QVGen Model) is much closer to full precision than this. "
        "The input MODEL is not changed, so a full-precision branch of the same graph can run beside it, and "
        "it can be quantized again with other settings. On the CPU each 4-bit layer keeps its weight codes "
        "unpacked after the first call (one byte per weight, twice the packed size)."
    ),
    inputs=[
        Input("model", "MODEL", "A Wan diffusion model, e.g. from Load Diffusion Model (UNETLoader)."),
        Input(
            "weight_bits",
            "COMBO",
            "Bits per weight (per output channel, asymmetric).",
            default="4",
            options=WEIGHT_BITS,
        ),
        Input(
            "act_bits",
            "COMBO",
            "Bits per activation (per token, dynamic); 'none' keeps activations in full precision.",
            default="4",
            options=ACT_BITS,
        ),
        Input(
            "skip",
            "STRING",
            "Layers to keep in full precision: comma-separated patterns of ComfyUI module names, e.g. "
            "head.head, time_embedding.*, blocks.0.*",
            default="",
            optional=True,
        ),
        Input(
            "clip_search",
            "BOOLEAN",
            "Search each weight row's clipping range (QVGen's initialisation) instead of plain min/max: "
            "better quality, slower to apply.",
            default=False,
            optional=True,
        ),
        Input(
            "backend",
            "COMBO",
            "Kernels for the low-bit matmuls (see Load QVGen Model).",
            default="auto",
            options=BACKENDS,
            optional=True,
        ),
    ],
    outputs=[Output("MODEL", "MODEL", "A quantized copy of the model (the input MODEL is unchanged).")],
    search_aliases=["rtn", "w4a4", "4-bit", "4bit", "int4", "quantize wan", "wan 2.1", "low-bit", "qvgen"],
)

NODE_SPECS = {s.node_id: s for s in (LOADER, QUANTIZE)}
