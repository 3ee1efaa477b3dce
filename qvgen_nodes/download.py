"""QVGen checkpoints from the Hugging Face Hub into ComfyUI's model folder.

A repo made by `python -m qvgen.hub push` holds the checkpoint twice: `comfyui/<name>.safetensors`
(one file) and `transformer/` (diffusers folder). The loader prefers the single file and falls
back to the folder. Files land under `<diffusion_models>/qvgen/<owner>--<name>[@<revision>]/`
with the repo's own layout, so they also show up in the loader's checkpoint list. With no network
(or `HF_HUB_OFFLINE=1`) whatever was downloaded before is used.

A repo of the QVGen authors (`Harahan/QVGen-Wan-1_3B-W4A4`: their fake-quantization layout,
`qvgen/adapters/official.py`) is downloaded the same way, converted once into
`comfyui/<name>.safetensors` in that folder (the download is then removed) and reused from there,
offline too. A local folder or file in the authors' layout is converted once into
`<diffusion_models>/qvgen/local--<name>-<hash>/` the same way.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("qvgen")

SUBDIR = "qvgen"
SINGLE_DIR = "comfyui"
FOLDER_DIR = "transformer"
AUTHORS_DIR = "authors"  # an authors' checkpoint while it is being converted
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class DownloadError(RuntimeError):
    """A Hub checkpoint cannot be fetched or found locally (the message says what to do)."""


def check_repo_id(repo_id: str) -> str:
    repo_id = repo_id.strip()
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise DownloadError(f"repo_id {repo_id!r}: expected a Hugging Face repo id like 'owner/name'")
    return repo_id


def local_dir(repo_id: str, revision: str | None, base: Path) -> Path:
    """`<base>/qvgen/<owner>--<name>` (plus `@<revision>` for anything but the default branch)."""
    folder = check_repo_id(repo_id).replace("/", "--")
    rev = (revision or "").strip()
    if rev and rev != "main":
        if not re.match(r"^[\w.-]+$", rev):
            raise DownloadError(f"revision {rev!r}: expected a branch, tag or commit hash")
        folder += f"@{rev}"
    return base / SUBDIR / folder


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def pick_files(files: list[str]) -> list[str]:
    """Which repo files make the checkpoint: the first `comfyui/*.safetensors`, else `transformer/`."""
    single = sorted(f for f in files if f.startswith(SINGLE_DIR + "/") and f.endswith(".safetensors"))
    if single:
        return single[:1]
    folder = sorted(
        f
        for f in files
        if f.startswith(FOLDER_DIR + "/")
        and (f.endswith(".safetensors") or f.endswith("config.json") or f.endswith(".index.json"))
    )
    if any(f == f"{FOLDER_DIR}/config.json" for f in folder):
        return folder
    return []


def checkpoint_in(folder: Path) -> Path | None:
    """The checkpoint a download folder holds (single file preferred), or None."""
    single = sorted((folder / SINGLE_DIR).glob("*.safetensors"))
    if single:
        return single[0]
    if (folder / FOLDER_DIR / "config.json").is_file() and any((folder / FOLDER_DIR).glob("*.safetensors")):
        return folder / FOLDER_DIR
    return None


def make_tqdm_class(progress_factory: Callable[[int], Any]) -> type:
    """A tqdm class that mirrors byte progress into a ComfyUI progress bar."""
    from tqdm.auto import tqdm

    class ComfyProgressTqdm(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._done = int(kwargs.get("initial") or 0)
            self._bar = progress_factory(int(self.total or 0)) if self.total else None

        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            self._done += int(n or 0)
            if self._bar is not None:
                self._bar.update_absolute(min(self._done, int(self.total or self._done)), int(self.total or 0))
            return out

    return ComfyProgressTqdm


def _supports_tqdm_class(fn: Callable) -> bool:
    try:
        return "tqdm_class" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def fetch(
    repo_id: str,
    revision: str | None,
    base: Path,
    *,
    progress_factory: Callable[[int], Any] | None = None,
    api: Any = None,
    download: Callable[..., str] | None = None,
    also: list[Path] | None = None,
) -> Path:
    """Make sure the checkpoint of `repo_id@revision` is under `base` and return its path.

    Online: list the repo, download what is missing or outdated (ComfyUI progress bar). Offline,
    or when the Hub cannot be reached: use the earlier download, or raise `DownloadError`.
    `also`: further model folders where an earlier download may sit (ComfyUI's extra model paths).
    `api`/`download` default to huggingface_hub's `HfApi()` and `hf_hub_download` (tests pass fakes).
    """
    repo_id = check_repo_id(repo_id)
    revision = (revision or "").strip() or None
    target = local_dir(repo_id, revision, base)
    files: list[str] | None = None
    reason = "HF_HUB_OFFLINE is set"
    if not is_offline():
        try:
            if api is None:
                from huggingface_hub import HfApi

                api = HfApi()
            files = list(api.list_repo_files(repo_id, revision=revision))
        except Exception as e:  # no network, DNS, proxy, 5xx: all mean "use what is there"
            if _is_not_found(e):
                raise DownloadError(f"{repo_id}@{revision or 'main'}: not found on the Hugging Face Hub ({e})") from e
            reason = f"the Hub cannot be reached ({type(e).__name__})"
            files = None
    if files is not None:
        wanted = pick_files(files)
        source = [] if wanted else authors_files(files)
        if source:
            return _fetch_authors(repo_id, revision, source, target, progress_factory, download)
        if not wanted:
            raise DownloadError(
                f"{repo_id}: no QVGen checkpoint in this repo (expected {SINGLE_DIR}/*.safetensors or "
                f"{FOLDER_DIR}/config.json with safetensors weights)"
            )
        if download is None:
            from huggingface_hub import hf_hub_download as download
        kwargs: dict[str, Any] = {"revision": revision, "local_dir": str(target)}
        if progress_factory is not None and _supports_tqdm_class(download):
            kwargs["tqdm_class"] = make_tqdm_class(progress_factory)
        for f in wanted:
            log.info("QVGen: fetching %s/%s into %s", repo_id, f, target)
            download(repo_id, f, **kwargs)
        found = checkpoint_in(target)
        if found is None:  # e.g. a download that wrote somewhere else
            raise DownloadError(f"{repo_id}: downloaded {wanted} but found no checkpoint in {target}")
        return found
    found = checkpoint_in(target)
    for other in also or []:
        if found is None and other != base:
            found = checkpoint_in(local_dir(repo_id, revision, other))
    if found is None:
        raise DownloadError(
            f"{repo_id}@{revision or 'main'}: not downloaded yet and {reason}. Connect once to download it "
            f"(it is stored in {target}), or put the .safetensors file in ComfyUI's models/diffusion_models "
            "folder and pick it in 'checkpoint'."
        )
    log.info("QVGen: %s; using the copy in %s", reason, found)
    return found


def authors_files(files: list[str]) -> list[str]:
    """The files of a QVGen authors' checkpoint in a repo listing (at the root or in `transformer/`):
    `config.json` and `diffusion_pytorch_model*` weights (+ index); [] when there is none."""
    for prefix in ("", FOLDER_DIR + "/"):
        here = [f[len(prefix) :] for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :]]
        weights = [f for f in here if f.startswith("diffusion_pytorch_model") and f.endswith((".safetensors", ".json"))]
        if "config.json" in here and any(f.endswith(".safetensors") for f in weights):
            return [prefix + f for f in ["config.json", *sorted(weights)]]
    return []


def _fetch_authors(
    repo_id: str,
    revision: str | None,
    source: list[str],
    target: Path,
    progress_factory: Callable[[int], Any] | None,
    download: Callable[..., str] | None,
) -> Path:
    """Download an authors' checkpoint and convert it once; later calls reuse the converted file."""
    found = checkpoint_in(target)
    if found is not None:
        log.info("QVGen: using %s, converted earlier from %s", found, repo_id)
        return found
    if download is None:
        from huggingface_hub import hf_hub_download as download
    staging = target / AUTHORS_DIR
    kwargs: dict[str, Any] = {"revision": revision, "local_dir": str(staging)}
    if progress_factory is not None and _supports_tqdm_class(download):
        kwargs["tqdm_class"] = make_tqdm_class(progress_factory)
    for f in source:
        log.info("QVGen: fetching %s/%s (the authors' layout) into %s", repo_id, f, staging)
        download(repo_id, f, **kwargs)
    out = convert_authors(
        staging / Path(source[0]).parent, target / SINGLE_DIR / f"{repo_id.split('/')[1]}.safetensors"
    )
    shutil.rmtree(staging, ignore_errors=True)
    return out


def convert_authors(source: Path, output: Path) -> Path:
    """Convert an authors' checkpoint (folder or file with its config.json) into one QVGen file."""
    from qvgen.adapters.official import convert_to_file
    from qvgen.checkpoint import CheckpointError

    log.info("QVGen: converting the authors' checkpoint %s into %s (once)", source, output)
    try:
        convert_to_file(source, output)
    except (CheckpointError, ValueError) as e:
        raise DownloadError(f"{source}: cannot convert this authors' checkpoint: {e}") from None
    return output


def is_authors_checkpoint(path: Path) -> bool:
    """Whether a local file or folder holds an authors' fake-quantization checkpoint (header read only)."""
    from qvgen.adapters.official import resolve_source

    try:
        files, _, _ = resolve_source(path)
        from safetensors import safe_open

        with safe_open(str(files[0]), framework="pt") as f:
            return any(k.endswith(".wquantizer.scale") for k in f.keys())
    except Exception:
        return False


def local_authors(path: Path, base: Path) -> Path:
    """A local authors' checkpoint, converted once into `<base>/qvgen/local--<name>-<hash>/` (again
    when the source file changes)."""
    path = path.expanduser().resolve()
    if not path.exists():
        raise DownloadError(f"{path}: no such file or folder")
    if not is_authors_checkpoint(path):
        raise DownloadError(
            f"{path}: not a checkpoint in the QVGen authors' layout (no '<layer>.wquantizer.scale' tensors in "
            "diffusion_pytorch_model*.safetensors); put QVGen checkpoints in models/diffusion_models instead"
        )
    from qvgen.adapters.official import resolve_source

    files, _, _ = resolve_source(path)
    stamp = max(f.stat().st_mtime for f in files)
    tag = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    name = re.sub(r"[^\w.-]", "_", path.stem if path.is_file() else path.name) or "model"
    out = base / SUBDIR / f"local--{name}-{tag}" / SINGLE_DIR / f"{name}.safetensors"
    if out.is_file() and out.stat().st_mtime >= stamp:
        log.info("QVGen: using %s, converted earlier from %s", out, path)
        return out
    return convert_authors(path, out)


def _is_not_found(e: Exception) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError"})


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
