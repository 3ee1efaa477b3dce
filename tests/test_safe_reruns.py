"""Reruns, interruptions and mistakes lose nothing and say what happened (issue #11, part 3).

Also: two identical training commands export byte-identical files, whatever ran before them.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_wan, tiny_wan_pipeline, write_clips

from qvgen import QVGenConfig
from qvgen.api import save_quantized
from qvgen.layers import top_svd
from qvgen.train import LatentDataset, TrainOptions, train
from qvgen.train.cli import main as train_main
from qvgen.train.data import DataError, discover
from qvgen.train.interrupt import TrainingInterrupted
from qvgen.train.prepare import CachedLatentDataset, prepare

ARGS = [
    "--num-frames", "5", "--height", "32", "--width", "32", "--max-text-len", "8", "--rank", "4",
    "--buckets", "2", "--no-progress", "--lr", "1e-4",
]  # fmt: skip


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-wan")
    tiny_wan_pipeline().save_pretrained(d)
    return d


def _data(n: int = 8) -> LatentDataset:
    g = torch.Generator().manual_seed(0)
    lat = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]
    txt = [torch.randn(5, 32, generator=g) for _ in range(n)]
    return LatentDataset(lat, txt, torch.zeros(5, 32))


def _train(out, steps=6, on_step=None, **kw):
    opts = TrainOptions(output_dir=out, steps=steps, batch_size=2, lr=1e-3, progress=False, checkpoint_every=3, **kw)
    return train(tiny_wan(), QVGenConfig(rank=4, phase_steps=2, n_buckets=2), _data(), opts, on_step=on_step)


def _temps(*folders):
    return [p for f in folders if f.is_dir() for p in f.iterdir() if p.name.endswith(".tmp")]


# ---- reproducibility -----------------------------------------------------------------------------
def test_randomized_svd_depends_on_its_seed_only():
    mat = torch.randn(96, 80, generator=torch.Generator().manual_seed(3))  # large enough for svd_lowrank
    torch.manual_seed(1)
    a = top_svd(mat, 4, seed=7)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = top_svd(mat, 4, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(top_svd(mat, 4, seed=8)[0], a[0])  # the seed does matter


def test_two_identical_commands_export_identical_files(tmp_path, pipe_dir):
    write_clips(tmp_path / "data", n=2, layout="jsonl")
    exports = []
    for i, other_draws in enumerate((1, 2)):
        torch.manual_seed(other_draws)  # whatever ran before must not matter
        out = tmp_path / f"run{i}"
        args = ["--model", str(pipe_dir), "--data", str(tmp_path / "data"), "--output", str(out), *ARGS]
        assert train_main([*args, "--steps", "3", "--checkpoint-every", "2"]) == 0
        exports.append((out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes())
    assert exports[0] == exports[1]


# ---- reruns --------------------------------------------------------------------------------------
def test_no_resume_moves_the_earlier_run_aside(tmp_path, caplog):
    out = tmp_path / "run"
    _train(out, steps=6)
    ckpts = out / "checkpoints"
    with caplog.at_level("INFO", logger="qvgen.train"):
        fresh = _train(out, steps=3, resume=False)
    assert fresh.resumed_from is None
    [aside] = list(out.glob("previous-run-*"))
    assert "moved to" in caplog.text and aside.name in caplog.text
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]
    assert len((aside / "train_log.jsonl").read_text().splitlines()) == 6
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000003"]  # the new run's, kept
    assert _train(out, steps=3).resumed_from == 3  # a plain rerun continues the new run, not the old one


def test_stale_temporary_files_are_removed_at_start(tmp_path, caplog):
    out = tmp_path / "run"
    _train(out, steps=3)
    (out / "checkpoints" / ".step-0000006.x1.tmp").mkdir()  # what kill -9 leaves mid-write
    (out / ".transformer.x2.tmp").mkdir()
    with caplog.at_level("INFO", logger="qvgen.train"):
        assert _train(out, steps=3).resumed_from == 3
    assert _temps(out, out / "checkpoints") == []
    assert "interrupted write" in caplog.text


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_after_the_step_with_a_checkpoint(tmp_path, sig):
    out = tmp_path / "run"
    full = _train(tmp_path / "full", steps=6)

    def send(step, rec):
        if step == 1:
            os.kill(os.getpid(), sig)

    before = signal.getsignal(sig)
    with pytest.raises(TrainingInterrupted, match="resume with the same command") as info:
        _train(out, steps=6, on_step=send)
    assert info.value.step == 2 and info.value.exit_code == 128 + sig
    assert signal.getsignal(sig) is before  # the previous handler is back
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]
    assert _temps(out, out / "checkpoints") == []
    resumed = _train(out, steps=6)
    assert resumed.resumed_from == 2
    losses = [r["loss"] for r in resumed.history]
    assert losses == pytest.approx([r["loss"] for r in full.history], rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_cli_interrupt_says_how_to_resume(tmp_path, pipe_dir, capsys, caplog):
    write_clips(tmp_path / "data", n=2, layout="jsonl")
    out = tmp_path / "run"
    args = ["--model", str(pipe_dir), "--output", str(out), *ARGS, "--phase-steps", "2", "--checkpoint-every", "1000"]
    log = out / "train_log.jsonl"

    def interrupt_when_training():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (log.is_file() and log.read_text().count("\n") >= 2):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=interrupt_when_training, daemon=True).start()
    rc = train_main([*args, "--data", str(tmp_path / "data"), "--steps", "100000"])
    said = capsys.readouterr().out
    assert rc == 128 + signal.SIGTERM, said
    assert "resume with the same command" in said
    [ckpt] = list((out / "checkpoints").iterdir())
    step = int(ckpt.name.split("-")[1])
    assert step >= 2 and len(log.read_text().splitlines()) == step
    with caplog.at_level("INFO", logger="qvgen.train"):
        assert train_main([*args, "--steps", str(step + 1)]) == 0
    assert f"resuming from step {step}" in caplog.text


# ---- data ----------------------------------------------------------------------------------------
def test_cache_is_keyed_by_content_not_position(tmp_path, pipe_dir):
    settings = dict(num_frames=5, height=32, width=32, max_text_len=8, progress=False)
    write_clips(tmp_path / "a", n=3, layout="jsonl")
    write_clips(tmp_path / "b", n=2, layout="jsonl")
    (tmp_path / "b" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file": f"clip{i}.gif", "text": f"another caption {i}"}) + "\n" for i in range(2))
    )
    cache = tmp_path / "cache"
    prepare(str(pipe_dir), tmp_path / "a", cache, **settings)
    prepare(str(pipe_dir), tmp_path / "b", cache, **settings)  # same output, other data
    mixed = CachedLatentDataset(cache)
    alone = CachedLatentDataset(prepare(str(pipe_dir), tmp_path / "b", tmp_path / "cache-b", **settings))
    assert len(mixed) == 2
    for i in range(2):
        for x, y in zip(mixed[i], alone[i], strict=True):
            assert torch.equal(x, y)
    prepare(str(pipe_dir), tmp_path / "a", cache, **settings)  # back to a: reused, not re-encoded
    assert len(CachedLatentDataset(cache)) == 3 and len(list(cache.glob("clip-*.safetensors"))) == 5


@pytest.mark.parametrize("layout", ["jsonl", "csv"])
def test_missing_captions_name_the_rows(tmp_path, layout):
    write_clips(tmp_path, n=3, layout=layout)
    if layout == "jsonl":
        rows = [{"file": "clip0.gif", "text": "a caption"}, {"file": "clip1.gif"}, {"file": "clip2.gif", "text": " "}]
        (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        lines = "line 2, 3"
    else:
        (tmp_path / "metadata.csv").write_text("file,text\nclip0.gif,\nclip1.gif,a caption\nclip2.gif,\n")
        lines = "line 2, 4"
    with pytest.raises(DataError, match=rf"metadata\.{layout}: 2 row\(s\) without a caption \({lines}\)"):
        discover(tmp_path)


# ---- sources -------------------------------------------------------------------------------------
def test_mistyped_model_path_is_one_line(tmp_path, capsys):
    rc = train_main(["--model", str(tmp_path / "no-such-pipeline"), "--output", str(tmp_path / "o"), *ARGS])
    assert rc == 2
    assert capsys.readouterr().out.strip() == f"error: --model {tmp_path / 'no-such-pipeline'}: no such folder " \
        "(expected a diffusers pipeline folder or a Hub id)"  # fmt: skip


def test_hub_model_offline_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    rc = train_main(["--model", "qvgen-test/not-cached", "--output", str(tmp_path / "o"), *ARGS])
    out = capsys.readouterr().out.strip()
    assert rc == 2 and len(out.splitlines()) == 1
    assert "qvgen-test/not-cached: not in the local Hugging Face cache and the Hub cannot be reached" in out


def test_a_run_writes_no_pickle(tmp_path):
    """The training cache, checkpoints and export are safetensors + JSON: no pickle anywhere in a run."""
    out = tmp_path / "run"
    _train(out, steps=3)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".safetensors", ".json", ".jsonl") for p in files), files
    load_file(out / "checkpoints" / "step-0000003" / "student.safetensors")


# ---- conversion, upload, loading -----------------------------------------------------------------
def _authors_checkpoint(folder):
    from test_convert_official import authors_state

    model = tiny_wan()
    folder.mkdir()
    save_file(authors_state(model), str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(dict(model.config)))
    return folder / "diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("target", ["file", "folder"])
def test_convert_refuses_to_replace_its_source(tmp_path, capsys, target):
    from qvgen.adapters.official import main as convert_main

    src = _authors_checkpoint(tmp_path / "authors")
    before = src.read_bytes()
    out = src if target == "file" else src.parent
    assert convert_main([str(src), str(out)]) == 2
    assert "would replace the source" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_convert_hub_source_offline_is_one_line(tmp_path, capsys, monkeypatch):
    from qvgen.adapters.official import main as convert_main

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert convert_main(["qvgen-test/not-cached", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "qvgen-test/not-cached: not in the local Hugging Face cache" in err


def test_hub_push_offline_is_one_line(tmp_path, capsys, monkeypatch):
    from qvgen.hub import main as hub_main

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_0123456789")
    result = _train(tmp_path / "run", steps=6)  # Φ decayed to rank 0 by step 6
    save_quantized(result.student, QVGenConfig(rank=4, phase_steps=2, n_buckets=2), tmp_path / "run" / "transformer")
    base = tmp_path / "base"
    tiny_wan_pipeline().save_pretrained(base)
    capsys.readouterr()
    rc = hub_main(["push", str(tmp_path / "run"), "qvgen-test/upload", "--base-model", str(base)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: qvgen-test/upload: the Hub cannot be reached in offline mode"), err
    assert "hf_not_a_real_token" not in err


def test_pickle_weights_are_refused(tmp_path):
    from diffusers import WanTransformer3DModel

    import qvgen  # noqa: F401  (registers the backend)
    from qvgen import CheckpointError
    from qvgen.surgery import convert_model, pack_model

    model, cfg = tiny_wan(), QVGenConfig(rank=0, n_buckets=2)
    convert_model(model, cfg, progress=False)
    pack_model(model, cfg)
    folder = tmp_path / "transformer"
    save_quantized(model, cfg, folder, dtype=torch.float32)
    weights = folder / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin: QVGen checkpoints are safetensors only"):
        WanTransformer3DModel.from_pretrained(folder)


def test_train_cli_passes_the_numerical_options_to_the_config():
    from qvgen.train.cli import build_parser, quant_config

    args = build_parser().parse_args(["--model", "m", "--seed", "7", "--zero-point-grad", "none"])
    cfg = quant_config(args)
    assert (cfg.transform_seed, cfg.zero_point_grad) == (7, "none")
    assert quant_config(build_parser().parse_args(["--model", "m"])).zero_point_grad == "ste"
