"""Wan 2.1 tensor names: diffusers (`WanTransformer3DModel`) ↔ ComfyUI (`comfy.ldm.wan.model.WanModel`).

QVGen checkpoints name tensors the diffusers way (`blocks.0.attn1.to_q.qweight`); ComfyUI's Wan
model names the same layer `blocks.0.self_attn.q`. The table follows diffusers'
`convert_wan_transformer_to_diffusers` (T2V and I2V). Renames act on whole dotted segments, so
the packed-layer tensors (`qweight`, `weight_scale`, `act_clip`, …) follow their layer. Pure
functions, no ComfyUI import: the ComfyUI loader (`qvgen_nodes/`) and tests use them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")

# (diffusers, ComfyUI) module-path prefixes; "{i}" is a block index. Order matters only for the
# norm2/norm3 swap, which is handled as a pair of exact renames.
_BLOCK_RULES: list[tuple[str, str]] = [
    ("attn1.to_q", "self_attn.q"),
    ("attn1.to_k", "self_attn.k"),
    ("attn1.to_v", "self_attn.v"),
    ("attn1.to_out.0", "self_attn.o"),
    ("attn1.norm_q", "self_attn.norm_q"),
    ("attn1.norm_k", "self_attn.norm_k"),
    ("attn2.to_q", "cross_attn.q"),
    ("attn2.to_k", "cross_attn.k"),
    ("attn2.to_v", "cross_attn.v"),
    ("attn2.to_out.0", "cross_attn.o"),
    ("attn2.norm_q", "cross_attn.norm_q"),
    ("attn2.norm_k", "cross_attn.norm_k"),
    ("attn2.add_k_proj", "cross_attn.k_img"),
    ("attn2.add_v_proj", "cross_attn.v_img"),
    ("attn2.norm_added_k", "cross_attn.norm_k_img"),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    # diffusers' norm2 is the (affine) cross-attention norm, ComfyUI's norm3, and vice versa.
    ("norm2", "norm3"),
    ("norm3", "norm2"),
    ("scale_shift_table", "modulation"),
]
_TOP_RULES: list[tuple[str, str]] = [
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    ("scale_shift_table", "head.modulation"),
    ("proj_out", "head.head"),
]

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
DIFFUSERS, COMFY = "diffusers", "comfyui"
# Keys that only one of the two namings has, used to tell them apart.
_COMFY_MARKERS = ("head.modulation", "head.head.", "self_attn.", "text_embedding.", "time_projection.")
_DIFFUSERS_MARKERS = ("scale_shift_table", "proj_out.", "condition_embedder.", ".attn1.", ".ffn.net.")


def _rename(rest: str, rules: list[tuple[str, str]], reverse: bool) -> str | None:
    for d, c in rules:
        src, dst = (c, d) if reverse else (d, c)
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src) :]
    return None


def _convert(name: str, reverse: bool) -> str:
    m = _BLOCK.match(name)
    if m:
        new = _rename(m.group(2), _BLOCK_RULES, reverse)
        return name if new is None else f"blocks.{m.group(1)}.{new}"
    new = _rename(name, _TOP_RULES, reverse)
    return name if new is None else new


def diffusers_to_comfy(name: str) -> str:
    """ComfyUI name of a diffusers Wan module path or tensor key (unknown names pass through)."""
    return _convert(name, reverse=False)


def comfy_to_diffusers(name: str) -> str:
    """diffusers name of a ComfyUI Wan module path or tensor key (unknown names pass through)."""
    return _convert(name, reverse=True)


def detect_naming(keys: Iterable[str]) -> str:
    """`"diffusers"` or `"comfyui"`: which naming a Wan state dict uses (a `model.diffusion_model.`
    prefix is ignored). Raises ValueError when neither is recognisable."""
    comfy = diffusers = 0
    for k in keys:
        k = k.removeprefix("model.diffusion_model.")
        comfy += any(k.startswith(m) or m in k for m in _COMFY_MARKERS)
        diffusers += any(k.startswith(m) or m in k for m in _DIFFUSERS_MARKERS)
    if comfy == diffusers == 0:
        raise ValueError("not a Wan state dict: no diffusers or ComfyUI Wan tensor names found")
    return COMFY if comfy > diffusers else DIFFUSERS


def to_comfy_state_dict(state_dict: Mapping[str, T]) -> dict[str, T]:
    """The state dict under ComfyUI's Wan names (returned as is when it already uses them)."""
    if detect_naming(state_dict) == COMFY:
        return {k.removeprefix("model.diffusion_model."): v for k, v in state_dict.items()}
    return {diffusers_to_comfy(k): v for k, v in state_dict.items()}


def to_diffusers_state_dict(state_dict: Mapping[str, T]) -> dict[str, T]:
    """The state dict under diffusers' Wan names (returned as is when it already uses them)."""
    if detect_naming(state_dict) == DIFFUSERS:
        return dict(state_dict)
    return {comfy_to_diffusers(k.removeprefix("model.diffusion_model.")): v for k, v in state_dict.items()}


__all__ = [
    "COMFY",
    "DIFFUSERS",
    "comfy_to_diffusers",
    "detect_naming",
    "diffusers_to_comfy",
    "to_comfy_state_dict",
    "to_diffusers_state_dict",
]
