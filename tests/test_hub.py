"""Hub I/O without a network: downloads served from a local HF cache, uploads staged and inspected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from tiny_models import tiny_wan, tiny_wan_pipeline, wan_inputs

import qvgen
from qvgen import QVGenConfig, convert_model, pack_model, save_quantized
from qvgen.hub import PATTERNS, HubError, find_source, main, pull, push, push_training_output, stage_upload

diffusers = pytest.importorskip("diffusers")
from diffusers import DiffusionPipeline, WanTransformer3DModel  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"
BASE_ID = "tiny-org/wan-tiny-base"
REPO_ID = "qvgen-test/wan-tiny-w4a4"
BASE_CARD = "---\nlicense: apache-2.0\nlibrary_name: diffusers\n---\n# tiny base\n"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)


def cache_repo(cache: Path, repo_id: str, src: Path, commit: str = COMMIT, branch: str = "main") -> Path:
    """Lay `src` out as a cached snapshot of `repo_id` the way huggingface_hub does."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / commit
    shutil.copytree(src, snap)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / branch).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished training run: transformer/ export, train_config.json, train_log.jsonl, metrics.json."""
    out = tmp_path_factory.mktemp("run") / "wan-run"
    model = tiny_wan()
    cfg = QVGenConfig(weight_bits=4, act_bits=4, rank=4, n_buckets=4, phase_steps=10)
    convert_model(model, cfg, progress=False)
    for m in model.modules():
        if isinstance(m, qvgen.QVGenLinear):
            m.remove_phi()  # the end of the rank-decay schedule
    pack_model(model, cfg)
    save_quantized(model, cfg, out / "transformer")
    (out / "train_config.json").write_text(
        json.dumps({"quantization": cfg.to_dict(), "options": {"steps": 60, "lr": 3e-5, "clip_lr": 0.01}})
    )
    (out / "train_log.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0 / (s + 1)}) + "\n" for s in range(60))
    )
    (out / "metrics.json").write_text(json.dumps({"velocity_mse": {"qvgen": 0.0123, "ptq": 0.0456}}))
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("base") / "wan-tiny-base"
    tiny_wan_pipeline().save_pretrained(base)
    (base / "README.md").write_text(BASE_CARD)
    (base / "LICENSE").write_text("Apache License 2.0 (test copy)\n")
    return base


# ---- download -------------------------------------------------------------------------------------
def test_allow_patterns_select_only_the_needed_files():
    from huggingface_hub.utils import filter_repo_objects

    repo = [
        "README.md",
        "model_index.json",
        "LICENSE",
        "comfyui/wan-w4a4.safetensors",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/pytorch_model.bin",
        "tokenizer/tokenizer.json",
        "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "assets/sample.mp4",
    ]

    def pick(what):
        from qvgen.hub import IGNORE

        return sorted(filter_repo_objects(repo, allow_patterns=PATTERNS[what], ignore_patterns=IGNORE.get(what)))

    assert pick("transformer") == [
        "README.md",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
    ]
    assert pick("comfyui") == ["README.md", "comfyui/wan-w4a4.safetensors"]
    full = pick("pipeline")
    assert "comfyui/wan-w4a4.safetensors" not in full and "text_encoder/pytorch_model.bin" not in full
    assert "assets/sample.mp4" not in full and {"model_index.json", "vae/diffusion_pytorch_model.safetensors"} <= set(
        full
    )


def test_pull_served_from_cache_offline_with_pinned_revision(tmp_path, run_dir, base_dir):
    plan = stage_upload(run_dir, REPO_ID, tmp_path / "staged", base_model=str(base_dir))
    cache = tmp_path / "cache"
    cache_repo(cache, REPO_ID, plan.folder)
    t = pull(REPO_ID, cache_dir=cache)
    assert t == cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT / "transformer"
    assert pull(REPO_ID, revision=COMMIT, cache_dir=cache, local_files_only=True) == t
    assert pull(REPO_ID, what="pipeline", cache_dir=cache) == t.parent
    assert pull(REPO_ID, what="comfyui", cache_dir=cache).name == "wan-tiny-w4a4.safetensors"
    with pytest.raises(HubError, match=r"not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        pull(REPO_ID, revision="v2", cache_dir=cache)
    with pytest.raises(HubError, match="not in the local Hugging Face cache"):
        pull("qvgen-test/absent", cache_dir=cache)
    # diffusers itself resolves the same cache offline, and the model is the one that was pushed.
    model = WanTransformer3DModel.from_pretrained(REPO_ID, subfolder="transformer", cache_dir=cache)
    ref = qvgen.load_quantized_model(run_dir / "transformer")
    x, t_, e = wan_inputs(batch=1)
    with torch.no_grad():
        a = model(x, t_[:1], e, return_dict=False)[0]
        b = ref(x, t_[:1], e, return_dict=False)[0]
    assert torch.allclose(a, b, atol=1e-5)
    pipe = DiffusionPipeline.from_pretrained(REPO_ID, cache_dir=cache)
    assert isinstance(pipe.transformer.blocks[0].attn1.to_q, qvgen.PackedLinear)


def test_pull_cli_offline(tmp_path, run_dir, base_dir, capsys):
    plan = stage_upload(run_dir, REPO_ID, tmp_path / "staged", base_model=str(base_dir), full_pipeline=False)
    cache = tmp_path / "cache"
    cache_repo(cache, REPO_ID, plan.folder)
    assert main(["pull", REPO_ID, "--cache-dir", str(cache), "--offline"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{COMMIT}/transformer")
    assert main(["pull", REPO_ID, "--what", "pipeline", "--cache-dir", str(cache)]) == 2
    assert "not a full pipeline repo" in capsys.readouterr().err


# ---- upload -----------------------------------------------------------------------------------------
def test_stage_full_pipeline_repo_exact_files_and_card(tmp_path, run_dir, base_dir):
    cache = tmp_path / "cache"
    cache_repo(cache, BASE_ID, base_dir)
    import huggingface_hub.constants as c

    c_old = c.HF_HUB_CACHE
    c.HF_HUB_CACHE = str(cache)
    try:
        plan = stage_upload(run_dir, REPO_ID, tmp_path / "staged", base_model=BASE_ID)
    finally:
        c.HF_HUB_CACHE = c_old
    base_files = sorted(
        p.relative_to(base_dir).as_posix()
        for p in base_dir.rglob("*")
        if p.is_file() and not p.relative_to(base_dir).as_posix().startswith("transformer/")
    )
    base_files.remove("README.md")
    expected = sorted(
        [*base_files, "README.md", "comfyui/wan-tiny-w4a4.safetensors"]
        + [f"transformer/{p.name}" for p in (run_dir / "transformer").iterdir()]
    )
    assert plan.files == expected
    card = plan.card
    assert (plan.folder / "README.md").read_text() == card
    for needle in (
        f"base_model: {BASE_ID}",
        "base_model_relation: quantized",
        "license: apache-2.0",
        "library_name: diffusers",
        "- w4a4",
        "W4A4 version of [tiny-org/wan-tiny-base]",
        "quantization-aware training",
        "| steps | 60 |",
        "| learning rate (activation clipping) | 0.01 |",
        "| final distillation loss | 0.01667 |",
        "| velocity_mse / qvgen | 0.0123 |",
        "4 timestep buckets",
        "rank 0 (removed)",
        f'DiffusionPipeline.from_pretrained("{REPO_ID}", torch_dtype=torch.bfloat16)',
        "import qvgen",
        "ComfyUI/models/diffusion_models",
        "comfyui/wan-tiny-w4a4.safetensors",
        "its license carries over: **apache-2.0**",
    ):
        assert needle in card, needle
    # The Hub reads the metadata with huggingface_hub's parser: the same fields come back.
    data = ModelCard.load(plan.folder / "README.md").data
    assert (data.base_model, data.base_model_relation, data.license) == (BASE_ID, "quantized", "apache-2.0")
    assert {"qvgen", "w4a4", "wan"} <= set(data.tags) and data.pipeline_tag == "text-to-video"
    # The staged folder is the repo: a diffusers pipeline that loads, and a ComfyUI file that validates.
    pipe = DiffusionPipeline.from_pretrained(plan.folder)
    assert isinstance(pipe.transformer.blocks[0].ffn.net[0].proj, qvgen.PackedLinear)
    single = qvgen.load_checkpoint(plan.folder / "comfyui" / "wan-tiny-w4a4.safetensors")
    folder = qvgen.load_checkpoint(run_dir / "transformer")
    assert single.config == folder.config and single.model_config == folder.model_config
    assert all(torch.equal(single.state_dict[k], v) for k, v in folder.state_dict.items())


def test_stage_transformer_only_and_cli_dry_run(tmp_path, run_dir, base_dir, capsys):
    staged = tmp_path / "dry"
    rc = main(
        ["push", str(run_dir), REPO_ID, "--base-model", str(base_dir), "--transformer-only", "--no-single-file"]
        + ["--dry-run", str(staged)]
    )
    assert rc == 0
    out = capsys.readouterr().out
    files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    assert files == sorted(
        ["README.md", "LICENSE", *[f"transformer/{p.name}" for p in (run_dir / "transformer").iterdir()]]
    )
    assert "nothing uploaded" in out and all(f in out for f in files)
    card = (staged / "README.md").read_text()
    assert 'WanTransformer3DModel.from_pretrained(\n    "qvgen-test/wan-tiny-w4a4", subfolder="transformer"' in card
    assert f'WanPipeline.from_pretrained("{base_dir}", transformer=transformer' in card
    assert "no single-file copy" in card
    assert "base_model:" not in card.split("---")[1]  # a local folder is not a Hub id: no metadata link


def test_card_without_license_or_training(tmp_path, run_dir, base_dir):
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    (base / "README.md").unlink()
    shutil.copytree(run_dir / "transformer", tmp_path / "t")
    plan = stage_upload(tmp_path / "t", REPO_ID, tmp_path / "s", base_model=str(base), method="ptq", metrics={})
    assert "license:" not in plan.card.split("---")[1]
    assert "the license of" in plan.card and "round-to-nearest" in plan.card
    assert "No evaluation metrics were recorded" in plan.card


def test_push_takes_the_token_from_the_environment_and_never_prints_it(
    tmp_path, run_dir, base_dir, monkeypatch, capsys
):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, **kw):
            calls["init"] = kw

        def create_repo(self, repo_id, **kw):
            calls["create_repo"] = (repo_id, kw)

        def create_branch(self, repo_id, **kw):
            calls["create_branch"] = (repo_id, kw)

        def upload_folder(self, **kw):
            folder = Path(kw["folder_path"])
            calls["files"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            calls["upload_folder"] = kw
            return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/abc"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no login cache either
    with pytest.raises(HubError, match="no Hugging Face token: set HF_TOKEN"):
        push(run_dir, REPO_ID, base_model=str(base_dir))
    assert "upload_folder" not in calls

    secret = "hf_" + "x" * 34
    monkeypatch.setenv("HF_TOKEN", secret)
    url = push_training_output(run_dir, REPO_ID, base_model=str(base_dir), private=True, revision="v1")
    assert url.endswith("/commit/abc")
    assert calls["create_repo"] == (REPO_ID, {"private": True, "exist_ok": True})
    assert calls["create_branch"] == (REPO_ID, {"branch": "v1", "exist_ok": True})
    up = calls["upload_folder"]
    assert up["repo_id"] == REPO_ID and up["revision"] == "v1" and "token" not in up
    assert "token" not in calls["init"]
    assert "README.md" in calls["files"] and "transformer/config.json" in calls["files"]
    assert not Path(up["folder_path"]).exists()  # the staging folder is cleaned up
    out = capsys.readouterr()
    assert secret not in out.out + out.err


def test_find_source_errors(tmp_path):
    with pytest.raises(HubError, match="no QVGen checkpoint here"):
        find_source(tmp_path)
    with pytest.raises(HubError, match="not a folder"):
        find_source(tmp_path / "missing")
