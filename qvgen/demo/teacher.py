"""The demo's full-precision teacher: a tiny Wan-architecture transformer that works directly on pixels.

`build_teacher` makes a `diffusers.WanTransformer3DModel` with the same blocks as Wan 2.1 (self-attention
with RoPE, cross-attention to the text, FFN, AdaLN time modulation) but two layers and a width of 128,
taking RGB clips (3 channels, no VAE) and the 32-dimensional embeddings of `qvgen.demo.text`.
`load_teacher` loads the weights trained by ``scripts/make_demo_teacher.py`` and committed in
``qvgen/demo/assets/teacher.safetensors`` (the model config travels in the file's metadata).
`sample` is a plain Euler flow-matching sampler for any model with Wan's call convention.

Flow matching as in Wan: ``x_t = (1 - σ) x0 + σ ε``, timestep ``t = 1000 σ``, and the model predicts
the velocity ``v = ε - x0``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import shapes, text

ASSETS = Path(__file__).resolve().parent / "assets"
TEACHER_PATH = ASSETS / "teacher.safetensors"

DEFAULT_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 2,
    "attention_head_dim": 64,
    "in_channels": 3,
    "out_channels": 3,
    "text_dim": text.TEXT_DIM,
    "freq_dim": 64,
    "ffn_dim": 256,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 64,
}
# what the teacher was trained on: (channels, frames, height, width) of one sample
DEFAULT_SHAPE = (3, shapes.FRAMES, shapes.SIZE, shapes.SIZE)
DEFAULT_SHIFT = 1.0


def build_teacher(config: dict[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """A freshly initialised tiny `WanTransformer3DModel` (``config`` overrides `DEFAULT_CONFIG` keys);
    initialisation is deterministic for a given ``seed`` and leaves the global RNG untouched."""
    from diffusers import WanTransformer3DModel

    cfg = {**DEFAULT_CONFIG, **(config or {})}
    cfg["patch_size"] = tuple(cfg["patch_size"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**cfg)


def teacher_metadata(path: str | Path = TEACHER_PATH) -> dict[str, Any]:
    """The JSON metadata stored with the weights: ``config`` (model), ``data`` (sample shape, text encoder)
    and ``training`` (how it was made)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: demo teacher weights not found (make them with scripts/make_demo_teacher.py)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path}: no 'config' entry in the safetensors metadata; not a demo teacher file")
    return {k: json.loads(v) for k, v in meta.items()}


def load_teacher(path: str | Path = TEACHER_PATH, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The committed trained teacher, in eval mode."""
    from safetensors.torch import load_file

    meta = teacher_metadata(path)
    model = build_teacher(meta["config"])
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


def save_teacher(model: nn.Module, path: str | Path = TEACHER_PATH, **metadata: Any) -> Path:
    """Write fp32 weights with ``config`` (the model's diffusers config) and any extra JSON metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if k in DEFAULT_CONFIG}
    meta = {"config": json.dumps(cfg), **{k: json.dumps(v) for k, v in metadata.items()}}
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)
    return path


def sigma_schedule(num_steps: int, shift: float = DEFAULT_SHIFT) -> Tensor:
    """``num_steps + 1`` noise levels from 1 to 0, with Wan/SD3's shift ``σ' = sσ / (1 + (s - 1)σ)``."""
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float()


def _input_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt_embeds: Tensor,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    num_steps: int = 20,
    shape: tuple[int, int, int, int] = DEFAULT_SHAPE,
    guidance_scale: float = 1.0,
    negative_embeds: Tensor | None = None,
    shift: float = DEFAULT_SHIFT,
    noise: Tensor | None = None,
    clip: bool = True,
) -> Tensor:
    """Euler flow-matching sampling: ``(B, C, F, H, W)`` float32 videos, in ``[-1, 1]`` when ``clip``.

    ``prompt_embeds`` is ``(B, L, D)`` (from `text.encode_prompts`). The starting noise comes from
    ``noise`` if given, else from ``generator``, else from ``torch.Generator().manual_seed(seed)``
    (drawn on the CPU in float32, so a seed gives the same noise for every model and device).
    ``guidance_scale > 1`` enables classifier-free guidance against ``negative_embeds`` (default: the
    empty prompt, i.e. zeros).
    """
    device, dtype = _device(model), _input_dtype(model)
    b = prompt_embeds.shape[0]
    if noise is None:
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
        noise = torch.randn((b, *shape), generator=generator, dtype=torch.float32)
    x = noise.float().to(device)
    cond = prompt_embeds.to(device, dtype)
    cfg = guidance_scale != 1.0
    if cfg:
        neg = torch.zeros_like(cond) if negative_embeds is None else negative_embeds.to(device, dtype).expand_as(cond)
        cond = torch.cat([neg, cond])
    sigmas = sigma_schedule(num_steps, shift).tolist()
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x_in = torch.cat([x, x]) if cfg else x
        t = torch.full((x_in.shape[0],), s * 1000.0, device=device, dtype=dtype)
        v = model(hidden_states=x_in.to(dtype), timestep=t, encoder_hidden_states=cond, return_dict=False)[0].float()
        if cfg:
            v_neg, v_pos = v.chunk(2)
            v = v_neg + guidance_scale * (v_pos - v_neg)
        x = x + (s_next - s) * v
    return x.clamp(-1, 1) if clip else x
