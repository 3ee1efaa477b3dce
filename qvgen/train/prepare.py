"""One-off encoding of the dataset with the pipeline's VAE and text encoder, cached as safetensors.

Training then keeps only the teacher and the student in memory. The cache folder holds one
`clip-<key>.safetensors` per clip (`latents`, `text`), `empty-<key>.safetensors` (the dropped-caption
embedding) and `index.json`, the clips of the last prepared dataset in order. Keys hash the source
file's identity, its caption, the encoder and the settings, so one cache serves several datasets and
settings without ever mixing them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..atomic import atomic_file, remove_stale_temps
from ..hub_errors import looks_like_path, reaching
from .data import Clip, DataError, discover, read_video
from .objectives import CogVideoXObjective, FlowMatchingObjective

CACHE_VERSION = 2  # 1 keyed clips by position (clip-000000...), which mixed datasets
INDEX_NAME = "index.json"
FAMILIES = {"WanPipeline": "wan", "CogVideoXPipeline": "cogvideox"}


def detect_family(model: str, revision: str | None = None) -> str:
    """'wan' or 'cogvideox', from the pipeline's `model_index.json` (local folder or Hub id)."""
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{path}: no model_index.json; expected a diffusers pipeline folder")
    elif looks_like_path(model) or path.exists():
        raise ValueError(f"--model {model}: no such folder (expected a diffusers pipeline folder or a Hub id)")
    else:
        from huggingface_hub import hf_hub_download

        with reaching(f"--model {model}"):
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
    """Encode every clip of `data` into `cache`, reusing clips encoded before with the same key.

    A clip's key hashes the video file's identity (resolved path, size, modification time), its caption,
    the encoder (model and revision) and the settings, so another dataset, an edited caption or other
    settings never reuse a stale encoding. `index.json` lists this dataset's clips in order.
    """
    cache = Path(cache)
    clips = discover(data)
    family = detect_family(model, revision)
    spec = {
        "version": CACHE_VERSION,
        "model": model,
        "revision": revision,
        "family": family,
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "max_text_len": max_text_len,
        "frame_stride": frame_stride,
    }
    names = [f"clip-{_clip_key(spec, clip)}.safetensors" for clip in clips]
    empty_name = f"empty-{_key(spec)}.safetensors"
    todo = [i for i, n in enumerate(names) if not (cache / n).is_file()]
    if todo or not (cache / empty_name).is_file():
        _encode_missing(model, family, revision, device, cache, spec, clips, names, todo, empty_name, progress)
    index = {
        "spec": spec,
        "empty": empty_name,
        "clips": [{"file": n, "source": str(c.path)} for n, c in zip(names, clips, strict=True)],
    }
    atomic_file(cache / INDEX_NAME, lambda p: p.write_text(json.dumps(index, indent=1)))
    return cache


def _key(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=10).hexdigest()


def _clip_key(spec: dict[str, Any], clip: Clip) -> str:
    st = clip.path.stat()
    return _key([spec, str(clip.path.resolve()), st.st_size, st.st_mtime_ns, clip.caption])


def _encode_missing(model, family, revision, device, cache, spec, clips, names, todo, empty_name, progress) -> None:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipe = _load_pipeline(model, family, device, dtype, revision)
    cache.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(cache)
    if not (cache / empty_name).is_file():
        empty = _encode_text(pipe, family, [""], spec["max_text_len"], device)[0]
        atomic_file(cache / empty_name, lambda p: save_file({"text": empty.cpu().contiguous()}, str(p)))
    for i in tqdm(todo, desc="QVGen: encoding dataset", disable=not progress):
        clip = clips[i]
        video = read_video(clip.path, spec["num_frames"], spec["height"], spec["width"], spec["frame_stride"])
        tensors = {
            "latents": _encode_video(pipe, family, video).cpu().contiguous(),
            "text": _encode_text(pipe, family, [clip.caption], spec["max_text_len"], device)[0].cpu().contiguous(),
        }
        meta = {"source": str(clip.path)}
        atomic_file(cache / names[i], lambda p, t=tensors, m=meta: save_file(t, str(p), metadata=m))
    del pipe


class CachedLatentDataset(Dataset):
    """Reads cached clips on demand (a real dataset does not fit in memory)."""

    def __init__(self, cache: str | Path) -> None:
        self.cache = Path(cache)
        index = self.cache / INDEX_NAME
        if not index.is_file():
            raise DataError(f"{index}: missing; encode the dataset first (pass --data)")
        meta = json.loads(index.read_text())
        self.files = [self.cache / c["file"] for c in meta["clips"]]
        empty = self.cache / meta["empty"]
        missing = [f for f in [*self.files, empty] if not f.is_file()]
        if missing:
            raise DataError(f"{missing[0]}: listed in {index} but missing; pass --data again to re-encode it")
        self.empty_text = load_file(str(empty))["text"]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        t = load_file(str(self.files[i]))
        return t["latents"].float(), t["text"].float()
