"""One-off encoding of the dataset with the pipeline's VAE and text encoder, cached as safetensors.

Training then keeps only the teacher and the student in memory. The cache folder holds one
`clip-NNNNNN.safetensors` per clip (`latents`, `text`), `empty.safetensors` (the dropped-caption
embedding) and `cache.json` describing how it was made, so a mismatched cache is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..checkpoint import _atomic_file
from .data import DataError, discover, read_video
from .objectives import CogVideoXObjective, FlowMatchingObjective

CACHE_VERSION = 1
FAMILIES = {"WanPipeline": "wan", "CogVideoXPipeline": "cogvideox"}


def detect_family(model: str, revision: str | None = None) -> str:
    """'wan' or 'cogvideox', from the pipeline's `model_index.json` (local folder or Hub id)."""
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{path}: no model_index.json; expected a diffusers pipeline folder")
    else:
        from huggingface_hub import hf_hub_download

        index = Path(hf_hub_download(model, "model_index.json", revision=revision))
    cls = json.loads(index.read_text()).get("_class_name", "")
    if cls not in FAMILIES:
        raise ValueError(f"{model}: pipeline {cls!r} is not supported; expected one of {sorted(FAMILIES)}")
    return FAMILIES[cls]


def load_teacher(model: str, family: str, dtype: torch.dtype, revision: str | None = None) -> nn.Module:
    from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel

    cls = WanTransformer3DModel if family == "wan" else CogVideoXTransformer3DModel
    return cls.from_pretrained(model, subfolder="transformer", torch_dtype=dtype, revision=revision)


def make_objective(model: str, family: str, teacher: nn.Module, revision: str | None = None):
    if family == "wan":
        return FlowMatchingObjective()
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    sched = CogVideoXDDIMScheduler.from_pretrained(model, subfolder="scheduler", revision=revision)
    rotary = None
    if teacher.config.use_rotary_positional_embeddings:
        ns = SimpleNamespace(transformer=teacher, vae_scale_factor_spatial=8)

        def rotary(latents: Tensor):  # latents: (B, F, C, h, w)
            _, f, _, h, w = latents.shape
            return CogVideoXPipeline._prepare_rotary_positional_embeddings(ns, h * 8, w * 8, f, latents.device)

    return CogVideoXObjective(sched.alphas_cumprod, rotary)


def _load_pipeline(model: str, family: str, device, dtype, revision):
    from diffusers import CogVideoXPipeline, WanPipeline

    cls = WanPipeline if family == "wan" else CogVideoXPipeline
    pipe = cls.from_pretrained(model, transformer=None, torch_dtype=dtype, revision=revision)
    return pipe.to(device)


@torch.no_grad()
def _encode_text(pipe, family: str, prompts: list[str], max_len: int, device) -> Tensor:
    embeds, _ = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False, max_sequence_length=max_len, device=device
    )
    return embeds


@torch.no_grad()
def _encode_video(pipe, family: str, video: Tensor) -> Tensor:
    vae = pipe.vae
    x = video[None].to(vae.device, vae.dtype)
    z = vae.encode(x).latent_dist.mode()
    if family == "wan":
        mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        return ((z - mean) / std)[0]
    return (z * vae.config.scaling_factor)[0].permute(1, 0, 2, 3)  # CogVideoX wants (F, C, H, W)


def prepare(
    model: str,
    data: str | Path,
    cache: str | Path,
    *,
    num_frames: int,
    height: int,
    width: int,
    max_text_len: int,
    frame_stride: int = 1,
    revision: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """Encode every clip of `data` into `cache` (skipping clips already there)."""
    cache = Path(cache)
    clips = discover(data)
    family = detect_family(model, revision)
    spec = {
        "version": CACHE_VERSION,
        "model": model,
        "family": family,
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "max_text_len": max_text_len,
        "frame_stride": frame_stride,
        "count": len(clips),
    }
    check_cache_spec(cache, spec)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipe = _load_pipeline(model, family, device, dtype, revision)
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "empty.safetensors").is_file():
        empty = _encode_text(pipe, family, [""], max_text_len, device)[0]
        _atomic_file(cache / "empty.safetensors", lambda p: save_file({"text": empty.cpu().contiguous()}, str(p)))
    for i, clip in enumerate(tqdm(clips, desc="QVGen: encoding dataset", disable=not progress)):
        out = cache / f"clip-{i:06d}.safetensors"
        if out.is_file():
            continue
        video = read_video(clip.path, num_frames, height, width, frame_stride)
        tensors = {
            "latents": _encode_video(pipe, family, video).cpu().contiguous(),
            "text": _encode_text(pipe, family, [clip.caption], max_text_len, device)[0].cpu().contiguous(),
        }
        meta = {"source": clip.path.name}
        _atomic_file(out, lambda p, t=tensors, m=meta: save_file(t, str(p), metadata=m))
    (cache / "cache.json").write_text(json.dumps(spec, indent=2))
    del pipe
    return cache


def check_cache_spec(cache: Path, spec: dict[str, Any]) -> None:
    """Refuse to mix clips encoded with other settings into an existing cache."""
    f = cache / "cache.json"
    if not f.is_file():
        return
    old = json.loads(f.read_text())
    diff = {k: (old.get(k), v) for k, v in spec.items() if k != "count" and old.get(k) != v}
    if diff:
        raise DataError(f"{cache}: cache was made with other settings {diff} (old, new); use another --cache folder")


class CachedLatentDataset(Dataset):
    """Reads cached clips on demand (a real dataset does not fit in memory)."""

    def __init__(self, cache: str | Path) -> None:
        self.cache = Path(cache)
        self.files = sorted(self.cache.glob("clip-*.safetensors"))
        if not self.files:
            raise DataError(f"{self.cache}: no encoded clips (run the prepare step first)")
        empty = self.cache / "empty.safetensors"
        if not empty.is_file():
            raise DataError(f"{empty}: missing (the prepare step did not finish)")
        self.empty_text = load_file(str(empty))["text"]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        t = load_file(str(self.files[i]))
        return t["latents"].float(), t["text"].float()
