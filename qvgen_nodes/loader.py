"""The QVGen loader's logic: find a checkpoint, build ComfyUI's Wan model with QVGen layers.

    checkpoint file/folder ──► qvgen.load_checkpoint (validates) ──► ComfyUI names (qvgen.adapters.comfy.names)
        ──► + shape-only `weight` placeholders so ComfyUI's model detection sees a Wan model
        ──► comfy.sd.load_diffusion_model_state_dict(custom_operations=QVGen ops) ──► ModelPatcher
        ──► timestep pre-hook on the diffusion model (activation-clipping buckets)

ComfyUI-specific calls go through `host`; everything here runs with fakes in the tests.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import download, host
from .backend_check import BackendError, check_backend
from .ops import OpsSettings, make_ops, quantized_layers
from .schema import NO_LOCAL

log = logging.getLogger("qvgen")

DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SUFFIXES = (".safetensors", ".sft")
META_KEY = "quantization_config"


class QVGenLoadError(RuntimeError):
    """The checkpoint cannot be turned into a ComfyUI model (the message names file and reason)."""


# ---- which files are QVGen checkpoints -------------------------------------------------------
_cache: dict[str, tuple[float, int, bool]] = {}
_cache_lock = threading.Lock()


def _is_qvgen_file(path: Path) -> bool:
    """Whether a .safetensors file carries a QVGen `quantization_config` (reads the header only)."""
    try:
        st = path.stat()
    except OSError:
        return False
    key = str(path)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None and hit[0] == st.st_mtime and hit[1] == st.st_size:
        return hit[2]
    ok = False
    try:
        from safetensors import safe_open

        with safe_open(key, framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
        cfg = json.loads(raw) if raw is not None else {}
        # ConvRot files (scheme convrot_w4a4) are ComfyUI-native: the stock "Load Diffusion Model" runs them
        ok = cfg.get("quant_method") == "qvgen" and cfg.get("scheme", "qvgen") == "qvgen"
    except Exception:  # unreadable, not safetensors, bad JSON: not ours
        ok = False
    with _cache_lock:
        _cache[key] = (st.st_mtime, st.st_size, ok)
    return ok


def _is_qvgen_folder(path: Path) -> bool:
    cfg = download.read_json(path / "config.json")
    q = cfg.get(META_KEY)
    return isinstance(q, dict) and q.get("quant_method") == "qvgen" and any(path.glob("*.safetensors"))


def list_checkpoints(dirs: list[Path] | None = None) -> list[str]:
    """QVGen checkpoints under ComfyUI's `diffusion_models` folders, as names relative to them:
    single files, and diffusers folders (`…/transformer`) written with a trailing separator."""
    dirs = host.diffusion_model_dirs() if dirs is None else dirs
    found: set[str] = set()
    for base in dirs:
        if not base.is_dir():
            continue
        for root, subdirs, files in os.walk(base, followlinks=True):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            here = Path(root)
            if "config.json" in files and _is_qvgen_folder(here) and here != base:
                found.add(os.path.relpath(here, base) + os.sep)
            for name in files:
                if name.endswith(SUFFIXES) and _is_qvgen_file(here / name):
                    found.add(os.path.relpath(here / name, base))
    return sorted(found)


def checkpoint_options(dirs: list[Path] | None = None) -> list[str]:
    """The loader's dropdown: the local checkpoints, then the "use repo_id" entry."""
    try:
        names = list_checkpoints(dirs)
    except Exception as e:  # a broken folder must never break ComfyUI's node list
        log.warning("QVGen: could not list checkpoints: %s", e)
        names = []
    return [*names, NO_LOCAL]


def resolve_checkpoint(name: str, dirs: list[Path] | None = None) -> Path:
    """Absolute path of a dropdown entry (refusing names that leave the model folders)."""
    dirs = host.diffusion_model_dirs() if dirs is None else dirs
    for base in dirs:
        candidate = (base / name).resolve()
        base_r = base.resolve()
        if candidate != base_r and base_r not in candidate.parents:
            continue
        if candidate.exists():
            return candidate
    raise QVGenLoadError(
        f"checkpoint {name!r}: not found in ComfyUI's diffusion_models folders {[str(d) for d in dirs]}"
    )


def locate(checkpoint: str, repo_id: str = "", revision: str = "", dirs: list[Path] | None = None) -> Path:
    """The checkpoint to load: `repo_id` when given (a Hub repo, downloaded if missing, or a local path;
    checkpoints in the QVGen authors' layout are converted once), else the dropdown entry."""
    rid = repo_id.strip()
    if rid:
        dirs = host.diffusion_model_dirs() if dirs is None else dirs
        base = host.download_dir(dirs)
        if is_local_path(rid):
            local = Path(rid).expanduser()
            if local.exists() and not download.is_authors_checkpoint(local):
                return local  # a QVGen checkpoint elsewhere on disk: load it where it is
            return download.local_authors(local, base)
        return download.fetch(repo_id, revision, base, progress_factory=host.progress_bar, also=dirs)
    if not checkpoint or checkpoint == NO_LOCAL:
        raise QVGenLoadError(
            "no checkpoint chosen: pick a QVGen .safetensors file in 'checkpoint' (from models/diffusion_models) "
            "or type a Hugging Face repo id in 'repo_id'"
        )
    return resolve_checkpoint(checkpoint, dirs)


def is_local_path(text: str) -> bool:
    """A path rather than a Hub id (`owner/name`): absolute, `~`/`.`-relative, Windows-style, or existing."""
    return text.startswith(("/", "~", ".", "\\")) or ":" in text or "\\" in text or Path(text).expanduser().exists()


# ---- state dict for ComfyUI ------------------------------------------------------------------
def comfy_state_dict(state: dict[str, Tensor], weight_bits: int) -> tuple[dict[str, Tensor], list[str]]:
    """The checkpoint under ComfyUI's Wan names, plus a shape-only `<layer>.weight` (meta tensor) per
    packed layer: ComfyUI's model detection reads e.g. `head.head.weight.shape`; the QVGen layers
    drop the placeholder when they load. Returns the dict and the packed layers' names."""
    from qvgen.adapters.comfy.names import to_comfy_state_dict

    try:
        sd = to_comfy_state_dict(state)
    except ValueError as e:
        raise QVGenLoadError(f"not a Wan 2.1 checkpoint: {e}") from None
    layers = sorted(k[: -len(".qweight")] for k in sd if k.endswith(".qweight"))
    packed = set(layers)
    float_dtypes = [t.dtype for k, t in sd.items() if t.is_floating_point() and k.rpartition(".")[0] not in packed]
    placeholder = float_dtypes[0] if float_dtypes else torch.bfloat16
    for name in layers:
        q = sd[f"{name}.qweight"]
        k = q.shape[1] * 2 if weight_bits <= 4 else q.shape[1]
        for key in (f"{name}.input_signs", f"{name}.smooth", f"{name}.phi_down"):
            if key in sd:
                k = sd[key].shape[-1]
                break
        sd[f"{name}.weight"] = torch.empty((q.shape[0], k), dtype=placeholder, device="meta")
    return sd, layers


def comfy_timestep(args: tuple, kwargs: dict[str, Any]) -> Any:
    """The timestep ComfyUI passes to the diffusion model (2nd argument, in [0, 1000]), one per sample;
    a whole-batch value when all samples share it (the usual cond/uncond batch)."""
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(t, Tensor) and t.numel() > 0:
        if t.dim() > 1:  # per-token timesteps (Wan 2.2 style): the sample's largest
            t = t.reshape(t.shape[0], -1).amax(dim=1)
        flat = t.reshape(-1)
        if flat.numel() > 1 and bool((flat == flat[0]).all()):
            t = flat[:1]
    return t


@dataclass
class Loaded:
    patcher: Any
    path: Path
    layers: int
    info: str


def load_model(path: Path, *, backend: str = "auto", compute_dtype: str = "default") -> Loaded:
    """Build ComfyUI's Wan model with QVGen layers from a checkpoint; returns its `ModelPatcher`."""
    from qvgen.checkpoint import CheckpointError, load_checkpoint
    from qvgen.timestep import TimestepState, attach_timestep_hook

    try:  # fail now, not at the first sampling step, when e.g. triton is missing
        check_backend(backend)
    except BackendError as e:
        raise QVGenLoadError(str(e)) from None
    if compute_dtype not in DTYPES:
        raise QVGenLoadError(f"compute_dtype {compute_dtype!r}: expected one of {list(DTYPES)}")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise QVGenLoadError(str(e)) from None
    cfg = ckpt.config
    sd, layers = comfy_state_dict(ckpt.state_dict, cfg.weight_bits)
    state = TimestepState(cfg.n_buckets, cfg.num_train_timesteps)
    settings = OpsSettings(config=cfg, backend=backend, timestep_state=state)
    options: dict[str, Any] = {"custom_operations": make_ops(host.base_ops(), settings)}
    if DTYPES[compute_dtype] is not None:
        options["dtype"] = DTYPES[compute_dtype]
    try:
        patcher = host.load_diffusion_model_state_dict(sd, options)
    except RuntimeError as e:
        raise QVGenLoadError(f"{path}: ComfyUI could not build the model: {e}") from None
    if patcher is None:
        raise QVGenLoadError(f"{path}: ComfyUI did not recognise this checkpoint as a diffusion model it supports")
    model = patcher.model.diffusion_model
    got = quantized_layers(model)
    if len(got) != len(layers):
        missing = sorted(set(layers) - set(got))[:5]
        raise QVGenLoadError(
            f"{path}: {len(layers)} packed layers in the checkpoint but {len(got)} in ComfyUI's model; "
            f"not placed: {missing} (is this a Wan 2.1 model?)"
        )
    attach_timestep_hook(model, state, extract=comfy_timestep)
    size = sum(p.numel() * p.element_size() for m in got.values() for p in m.parameters())
    info = (
        f"QVGen W{cfg.weight_bits}A{cfg.act_bits or 16}: {len(got)} packed layers ({size / 2**20:.1f} MiB), "
        f"{cfg.n_buckets} clipping buckets, kernel backend {backend}"
    )
    log.info("%s from %s", info, path)
    return Loaded(patcher, path, len(got), info)
