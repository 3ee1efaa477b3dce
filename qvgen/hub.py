"""Hugging Face Hub I/O of QVGen checkpoints: `python -m qvgen.hub pull|push`.

    python -m qvgen.hub pull org/wan-w4a4 --revision 3f2c… [--what transformer|pipeline|comfyui]
    python -m qvgen.hub push ./run-output org/wan-w4a4 --base-model Wan-AI/Wan2.1-T2V-1.3B-Diffusers
    python -m qvgen.hub push ./run-output org/wan-w4a4 --base-model … --dry-run ./staged   # nothing sent

Downloads go through `huggingface_hub.snapshot_download`: the shared HF cache, a pinned
`--revision`, `allow_patterns` so only the requested part comes down, and `HF_HUB_OFFLINE=1`
served from the cache. Uploads stage exactly the files to push (the quantized transformer, the
base model's other components for a ready-to-run pipeline repo, a single-file copy for ComfyUI,
the generated model card) and send them in one commit. The token comes only from `HF_TOKEN` or
the `hf auth login` cache, as huggingface_hub resolves it; it is never taken as an argument nor printed.

Repository layout (a diffusers pipeline repo):
    model_index.json, scheduler/, text_encoder/, tokenizer/, vae/   (from the base model; full repos)
    transformer/config.json + diffusion_pytorch_model*.safetensors  (QVGen checkpoint format)
    comfyui/<name>.safetensors                                       (same tensors, one file)
    README.md                                                        (model card)
A model trained for a ComfyUI-native scheme (`--scheme convrot_w4a4`, `nvfp4`) is its one file:
such a repo holds `comfyui/<name>.safetensors` (ComfyUI's own format), the base model's license
and the card, plus the run's `transformer/` folder (the same tensors for diffusers) when there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import CONFIG_NAME, META_MODEL_CONFIG, META_QCONFIG, CheckpointError, load_checkpoint
from .hub_errors import reaching
from .model_card import CardInfo, render_model_card

TRANSFORMER = "transformer"
COMFYUI_DIR = "comfyui"
PROVENANCE = "qvgen_provenance.json"
WEIGHT_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".tiktoken")
PATTERNS: dict[str, list[str]] = {
    "transformer": [
        "transformer/config.json",
        "transformer/diffusion_pytorch_model*.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "transformer/qvgen_provenance.json",
        "README.md",
    ],
    "pipeline": ["model_index.json", "README.md", "LICENSE*", *[f"*/*{s}" for s in WEIGHT_SUFFIXES]],
    "comfyui": ["comfyui/*.safetensors", "README.md"],
    "card": ["README.md", "LICENSE*", "model_index.json"],
}
IGNORE: dict[str, list[str]] = {"pipeline": ["comfyui/*"]}


class HubError(RuntimeError):
    """A Hub download or upload cannot go ahead (message says why and what to do)."""


# ---- download ------------------------------------------------------------------------------------
def pull(
    repo_id: str,
    *,
    what: str = "transformer",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """Download one part of a QVGen repo (`transformer`, `pipeline`, `comfyui`) and return the
    folder that holds it: the snapshot root for `pipeline`, `<root>/transformer`, or the ComfyUI file.

    Served from the cache when `HF_HUB_OFFLINE=1` or `local_files_only=True`; a pinned `revision`
    (branch, tag or commit) is honoured in both cases.
    """
    if what not in ("transformer", "pipeline", "comfyui"):
        raise ValueError(f"what: expected 'transformer', 'pipeline' or 'comfyui', got {what!r}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        root = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                local_dir=local_dir,
                local_files_only=local_files_only,
                allow_patterns=PATTERNS[what],
                ignore_patterns=IGNORE.get(what),
                library_name="qvgen",
            )
        )
    except LocalEntryNotFoundError as e:
        raise HubError(
            f"{repo_id}@{revision or 'main'}: not in the local Hugging Face cache and the Hub cannot be reached "
            f"({e.__class__.__name__}). Run `python -m qvgen.hub pull {repo_id}` once with network access "
            "(or unset HF_HUB_OFFLINE)."
        ) from None
    return _check_pulled(root, what, repo_id)


def _check_pulled(root: Path, what: str, repo_id: str) -> Path:
    if what == "transformer":
        folder = root / TRANSFORMER
        if not (folder / CONFIG_NAME).is_file() or not any(folder.glob("diffusion_pytorch_model*.safetensors")):
            raise HubError(f"{repo_id}: no QVGen transformer (transformer/config.json + safetensors) in {root}")
        return folder
    if what == "pipeline":
        if not (root / "model_index.json").is_file():
            raise HubError(
                f"{repo_id}: no model_index.json, so this is not a full pipeline repo; pull --what transformer "
                "and combine it with the base model"
            )
        return root
    files = sorted((root / COMFYUI_DIR).glob("*.safetensors"))
    if not files:
        raise HubError(f"{repo_id}: no single-file checkpoint under {COMFYUI_DIR}/")
    return files[0]


# ---- what gets uploaded ------------------------------------------------------------------------
@dataclass
class Source:
    """A local QVGen checkpoint and what is known about how it was made."""

    transformer: Path | None  # the diffusers model folder with a quantization_config
    run_dir: Path | None = None  # training run folder (train_config.json, train_log.jsonl)
    pipeline_dir: Path | None = None  # a local pipeline folder the transformer belongs to
    provenance: dict[str, Any] = field(default_factory=dict)
    comfy_file: Path | None = None  # instead of `transformer`: a ComfyUI-native export (one file)


def find_source(path: str | os.PathLike) -> Source:
    """Accept a training run folder, a pipeline folder, or the quantized transformer folder itself; for
    ComfyUI-native schemes a run folder (its `comfyui/` export) or the exported file."""
    path = Path(path)
    comfy = _comfy_native_file(path)
    if comfy is not None:
        run = comfy.parent.parent
        folder = run / TRANSFORMER if (run / TRANSFORMER / CONFIG_NAME).is_file() else None  # its diffusers form
        return Source(folder, run if (run / "train_config.json").is_file() else None, comfy_file=comfy)
    if not path.is_dir():
        raise HubError(f"{path}: not a folder (expected a QVGen training output or transformer folder)")
    for folder in (path, path / TRANSFORMER):
        cfg = folder / CONFIG_NAME
        if cfg.is_file() and "quantization_config" in _read_json(cfg):
            break
    else:
        raise HubError(
            f"{path}: no QVGen checkpoint here (looked for config.json with a 'quantization_config' in "
            f"{path} and {path / TRANSFORMER})"
        )
    src = Source(transformer=folder)
    parent = folder.parent if folder != path else path
    if (parent / "train_config.json").is_file():
        src.run_dir = parent
    if (parent / "model_index.json").is_file():
        src.pipeline_dir = parent
    if (folder / PROVENANCE).is_file():
        src.provenance = _read_json(folder / PROVENANCE)
    return src


def _comfy_native_file(path: Path) -> Path | None:
    """The ComfyUI-native export at `path` (the file, or the single one in a run's `comfyui/`), if any."""
    from .adapters.comfy.native import is_comfy_native
    from .checkpoint import read_safetensors_metadata

    files = [path] if path.is_file() else sorted((path / COMFYUI_DIR).glob("*.safetensors")) if path.is_dir() else []
    # a QVGen export's comfyui/ copy (scheme "qvgen") is not native: its transformer/ folder is the source
    native = [f for f in files if f.suffix == ".safetensors" and is_comfy_native(read_safetensors_metadata(f))]
    if len(native) > 1:
        raise HubError(f"{path}: several ComfyUI-native files {[f.name for f in native]}; pass the one to push")
    return native[0] if native else None


@dataclass
class UploadPlan:
    """The staged folder that would be pushed, file by file, and its model card."""

    folder: Path
    files: list[str]
    card: str
    info: CardInfo


def stage_upload(
    source: str | os.PathLike | Source,
    repo_id: str,
    staging: str | os.PathLike,
    *,
    base_model: str | None = None,
    base_revision: str | None = None,
    full_pipeline: bool = True,
    single_file: bool = True,
    metrics: dict[str, Any] | str | os.PathLike | None = None,
    method: str | None = None,
) -> UploadPlan:
    """Write into `staging` exactly what `push` uploads (no network unless the base model's
    files have to be fetched from the Hub), and return the plan."""
    src = source if isinstance(source, Source) else find_source(source)
    if src.comfy_file is not None:
        return _stage_comfy_file(src, repo_id, Path(staging), base_model, base_revision, metrics, method)
    ckpt = load_checkpoint(src.transformer)  # validates every tensor before anything is uploaded
    staging = Path(staging)
    if staging.exists() and any(staging.iterdir()):
        raise HubError(f"{staging}: staging folder must be empty")
    staging.mkdir(parents=True, exist_ok=True)

    base_model = base_model or src.provenance.get("base_model")
    if not base_model:
        raise HubError("--base-model is required: the Hub id (or local folder) of the full-precision model")
    base = _base_files(base_model, base_revision, full_pipeline, src)
    _link_tree(src.transformer, staging / TRANSFORMER)
    if full_pipeline:
        index = _read_json(base / "model_index.json")
        for comp, spec in index.items():
            if comp.startswith("_") or comp == TRANSFORMER or not isinstance(spec, list) or spec[0] is None:
                continue
            if not (base / comp).is_dir():
                raise HubError(f"{base_model}: component folder '{comp}' listed in model_index.json is missing")
            _link_tree(base / comp, staging / comp)
        _link(base / "model_index.json", staging / "model_index.json")
    for lic in sorted(base.glob("LICENSE*")):
        _link(lic, staging / lic.name)
    name = repo_id.split("/")[-1]
    single = None
    if single_file:
        single = f"{COMFYUI_DIR}/{name}.safetensors"
        write_single_file(ckpt, staging / single)

    info = CardInfo(
        repo_id=repo_id,
        base_model=_hub_id(str(base_model)),
        config=ckpt.config,
        transformer_class=ckpt.model_config.get("_class_name", "WanTransformer3DModel"),
        pipeline_class=_pipeline_class(base),
        method=method or src.provenance.get("method") or ("qat" if src.run_dir else "unknown"),
        source=src.provenance.get("source"),
        full_pipeline=full_pipeline,
        single_file=single,
        diffusers_folder=src.transformer is not None,
        training=_read_json(src.run_dir / "train_config.json") if src.run_dir else None,
        final_log=_last_log(src.run_dir) if src.run_dir else None,
        metrics=_load_metrics(metrics, src),
        sizes={"transformer size": sum(f.stat().st_size for f in (staging / TRANSFORMER).rglob("*") if f.is_file())},
    )
    info.license, info.license_name, info.license_link = _base_license(base)
    card = render_model_card(info)
    card.save(staging / "README.md")
    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    return UploadPlan(staging, files, str(card), info)


def _stage_comfy_file(src: Source, repo_id: str, staging: Path, base_model, base_revision, metrics, method):
    """`stage_upload` for a ComfyUI-native export: the file under `comfyui/`, the license, the card."""
    from .adapters.comfy.native import ComfyNativeError, read_comfy_native

    try:
        f = read_comfy_native(src.comfy_file)  # validates every quantized layer before anything is uploaded
    except ComfyNativeError as e:
        raise HubError(str(e)) from None
    if f.config is None:
        raise HubError(f"{src.comfy_file}: no QVGen 'quantization_config' in the metadata (not a QVGen export)")
    if staging.exists() and any(staging.iterdir()):
        raise HubError(f"{staging}: staging folder must be empty")
    staging.mkdir(parents=True, exist_ok=True)
    if not base_model:
        raise HubError("--base-model is required: the Hub id (or local folder) of the full-precision model")
    base = _base_files(base_model, base_revision, False, src)
    for lic in sorted(base.glob("LICENSE*")):
        _link(lic, staging / lic.name)
    single = f"{COMFYUI_DIR}/{repo_id.split('/')[-1]}.safetensors"
    (staging / COMFYUI_DIR).mkdir()
    _link(src.comfy_file, staging / single)
    if src.transformer is not None:  # the same tensors as a diffusers folder (python -m qvgen.train writes both)
        _link_tree(src.transformer, staging / TRANSFORMER)
    info = CardInfo(
        repo_id=repo_id,
        base_model=_hub_id(str(base_model)),
        config=f.config,
        transformer_class=f.model_config.get("_class_name", "WanTransformer3DModel"),
        pipeline_class=_pipeline_class(base),
        method=method or ("qat" if src.run_dir else "unknown"),
        full_pipeline=False,
        single_file=single,
        diffusers_folder=src.transformer is not None,
        training=_read_json(src.run_dir / "train_config.json") if src.run_dir else None,
        final_log=_last_log(src.run_dir) if src.run_dir else None,
        metrics=_load_metrics(metrics, src),
        sizes={"file size": src.comfy_file.stat().st_size},
        extra_tags=[f.config.scheme, "comfyui"],
    )
    info.license, info.license_name, info.license_link = _base_license(base)
    card = render_model_card(info)
    card.save(staging / "README.md")
    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    return UploadPlan(staging, files, str(card), info)


def push(
    source: str | os.PathLike,
    repo_id: str,
    *,
    base_model: str | None = None,
    base_revision: str | None = None,
    private: bool = False,
    revision: str | None = None,
    full_pipeline: bool = True,
    single_file: bool = True,
    metrics: dict[str, Any] | str | os.PathLike | None = None,
    method: str | None = None,
    commit_message: str | None = None,
    staging: str | os.PathLike | None = None,
) -> str:
    """Stage and upload a QVGen checkpoint in one commit; returns the commit URL.

    The token is whatever huggingface_hub finds (`HF_TOKEN`, or the login cache).
    """
    import tempfile

    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (the token is never printed)")
    tmp = None
    if staging is None:
        tmp = tempfile.mkdtemp(prefix="qvgen-push-")
        staging = Path(tmp) / "repo"
    try:
        plan = stage_upload(
            source,
            repo_id,
            staging,
            base_model=base_model,
            base_revision=base_revision,
            full_pipeline=full_pipeline,
            single_file=single_file,
            metrics=metrics,
            method=method,
        )
        api = HfApi(library_name="qvgen")
        with reaching(repo_id, HubError):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=str(plan.folder),
                revision=revision,
                commit_message=commit_message or f"QVGen {plan.info.bits} checkpoint of {plan.info.base_model}",
            )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(getattr(info, "commit_url", info))


def push_training_output(output_dir: str | os.PathLike, repo_id: str, *, base_model: str, private: bool = False, **kw):
    """`python -m qvgen.train … --push-to-hub org/name`: push the run's export with its training record."""
    url = push(output_dir, repo_id, base_model=base_model, private=private, method="qat", **kw)
    print(f"pushed to https://huggingface.co/{repo_id} ({url})")
    return url


# ---- single file ----------------------------------------------------------------------------------
def write_single_file(ckpt, path: Path) -> Path:
    """The ComfyUI layout of a checkpoint: the same tensors in one safetensors file, with the
    `quantization_config` and the diffusers model config in its metadata (docs/format.md)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        META_QCONFIG: ckpt.config.to_json(),
        META_MODEL_CONFIG: json.dumps(ckpt.model_config),
        "format": "pt",
    }
    save_file({k: v.contiguous() for k, v in ckpt.state_dict.items()}, str(path), metadata=meta)
    return path


# ---- base model ---------------------------------------------------------------------------------
def _base_files(base_model: str, revision: str | None, full_pipeline: bool, src: Source) -> Path:
    """A folder holding the base model's model_index.json, card and license (and its other
    components when a full pipeline repo is staged): the local folder itself, or a cache snapshot."""
    local = Path(base_model)
    if local.is_dir():
        if full_pipeline and not (local / "model_index.json").is_file():
            raise HubError(f"{local}: not a diffusers pipeline folder (no model_index.json)")
        return local
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    what = "pipeline" if full_pipeline else "card"
    try:
        return Path(
            snapshot_download(
                base_model,
                revision=revision,
                allow_patterns=PATTERNS[what],
                ignore_patterns=[f"{TRANSFORMER}/*", *IGNORE.get(what, [])],
                library_name="qvgen",
            )
        )
    except LocalEntryNotFoundError as e:
        raise HubError(f"{base_model}: base model files not in the cache and the Hub cannot be reached ({e})") from None


def _hub_id(base_model: str) -> str:
    """The Hub id of the base model; a folder inside the HF cache (`models--org--name/snapshots/…`) maps back to
    its id, any other local folder stays a path (the card then carries no `base_model` metadata)."""
    path = Path(base_model)
    if not path.exists():
        return base_model
    for part in path.resolve().parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part[len("models--") :].replace("--", "/", 1)
    return base_model


def _base_license(base: Path) -> tuple[str | None, str | None, str | None]:
    readme = base / "README.md"
    if not readme.is_file():
        return None, None, None
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme).data
    except Exception:  # a card without valid metadata: the license is simply unknown
        return None, None, None
    return data.get("license"), data.get("license_name"), data.get("license_link")


def _pipeline_class(base: Path) -> str | None:
    index = base / "model_index.json"
    return _read_json(index).get("_class_name") if index.is_file() else None


# ---- small helpers --------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HubError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise HubError(f"{path}: expected a JSON object")
    return data


def _last_log(run_dir: Path) -> dict[str, Any] | None:
    log = run_dir / "train_log.jsonl"
    if not log.is_file():
        return None
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def _load_metrics(metrics: dict[str, Any] | str | os.PathLike | None, src: Source) -> dict[str, Any] | None:
    if isinstance(metrics, dict):
        return metrics
    if metrics is not None:
        return _read_json(Path(metrics))
    for folder in (src.run_dir, src.transformer):
        if folder is not None and (folder / "metrics.json").is_file():
            return _read_json(folder / "metrics.json")
    return None


def _link(src: Path, dst: Path) -> None:
    """Hard link when possible (same disk, no copy), else copy; never a symlink into the cache."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    real = src.resolve()
    try:
        os.link(real, dst)
    except OSError:
        shutil.copy2(real, dst)


def _link_tree(src: Path, dst: Path) -> None:
    for f in sorted(src.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            _link(f, dst / f.relative_to(src))


# ---- CLI -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qvgen.hub", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("pull", help="download a QVGen checkpoint (cache, pinned revision, offline)")
    pl.add_argument("repo_id")
    pl.add_argument("--what", choices=["transformer", "pipeline", "comfyui"], default="transformer")
    pl.add_argument("--revision", default=None, help="branch, tag or commit hash to pin")
    pl.add_argument("--cache-dir", default=None, help="default: the shared Hugging Face cache")
    pl.add_argument("--local-dir", default=None, help="copy the files into this folder instead")
    pl.add_argument("--offline", action="store_true", help="never touch the network (same as HF_HUB_OFFLINE=1)")

    ps = sub.add_parser("push", help="upload a QVGen checkpoint with a generated model card")
    ps.add_argument("source", help="training output folder, or the quantized transformer folder")
    ps.add_argument("repo_id", help="org/name on the Hub")
    ps.add_argument("--base-model", help="the full-precision model (Hub id or local pipeline folder)")
    ps.add_argument("--base-revision", default=None)
    ps.add_argument("--transformer-only", action="store_true", help="do not include the base model's other components")
    ps.add_argument("--no-single-file", action="store_true", help="do not add the ComfyUI single-file copy")
    ps.add_argument("--metrics", help="JSON file of measured metrics for the card")
    ps.add_argument("--method", choices=["qat", "ptq", "converted"], default=None)
    ps.add_argument("--private", action="store_true")
    ps.add_argument("--revision", default=None, help="branch to commit to (created if needed)")
    ps.add_argument("--dry-run", metavar="DIR", help="stage the exact files and card into DIR, upload nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "pull":
            path = pull(
                args.repo_id,
                what=args.what,
                revision=args.revision,
                cache_dir=args.cache_dir,
                local_dir=args.local_dir,
                local_files_only=args.offline,
            )
            print(path)
            return 0
        kw = dict(
            base_model=args.base_model,
            base_revision=args.base_revision,
            full_pipeline=not args.transformer_only,
            single_file=not args.no_single_file,
            metrics=args.metrics,
            method=args.method,
        )
        if args.dry_run:
            plan = stage_upload(args.source, args.repo_id, args.dry_run, **kw)
            print(f"dry run: {len(plan.files)} files staged in {plan.folder} (nothing uploaded):")
            for f in plan.files:
                print(f"  {f}")
            return 0
        url = push(args.source, args.repo_id, private=args.private, revision=args.revision, **kw)
        print(f"pushed: {url}")
        return 0
    except (HubError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


__all__ = ["HubError", "UploadPlan", "find_source", "pull", "push", "push_training_output", "stage_upload"]
if __name__ == "__main__":
    raise SystemExit(main())
