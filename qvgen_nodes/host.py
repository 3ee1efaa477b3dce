"""Everything the pack asks of ComfyUI, in one place (the seam tests replace).

Each function imports ComfyUI lazily, so the rest of `qvgen_nodes` imports and is testable
without ComfyUI; tests monkeypatch these functions with fakes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FOLDER = "diffusion_models"


def diffusion_model_dirs() -> list[Path]:
    """ComfyUI's `diffusion_models` folders (models/diffusion_models, legacy models/unet, extra paths)."""
    import folder_paths

    return [Path(p) for p in folder_paths.get_folder_paths(FOLDER)]


def download_dir(dirs: list[Path] | None = None) -> Path:
    """Where Hub downloads go: models/diffusion_models (ComfyUI also lists the legacy models/unet
    under the same name, first), else the first folder configured."""
    dirs = diffusion_model_dirs() if dirs is None else dirs
    if not dirs:
        raise RuntimeError("ComfyUI has no 'diffusion_models' folder configured")
    return next((d for d in dirs if d.name == FOLDER), dirs[0])


def base_ops() -> type:
    """The ComfyUI operations QVGen's `Linear` is added to: `manual_cast`, which casts the remaining
    full-precision weights (norms, patch embedding) to the compute dtype on the fly."""
    import comfy.ops

    return comfy.ops.manual_cast


def load_diffusion_model_state_dict(sd: dict, model_options: dict) -> Any:
    """ComfyUI's own diffusion-model loader (model detection, dtype choice, `ModelPatcher`)."""
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(sd, model_options=model_options)


def progress_bar(total: int) -> Any:
    """ComfyUI's progress bar for the running node (`update_absolute(value, total)`)."""
    import comfy.utils

    return comfy.utils.ProgressBar(total)


def check_interrupted() -> None:
    """Raise ComfyUI's interruption exception when the user pressed Cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def torch_device() -> Any:
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def offload_device() -> Any:
    import comfy.model_management

    return comfy.model_management.unet_offload_device()
