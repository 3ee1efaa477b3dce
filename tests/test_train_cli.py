"""`python -m qvgen.train` end to end on a tiny local Wan pipeline, plus its input errors."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_wan_pipeline, write_clips

from qvgen import PackedLinear, load_quantized_model
from qvgen.train.cli import main
from qvgen.train.data import DataError, discover, read_video


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-wan")
    tiny_wan_pipeline().save_pretrained(d)
    return d


ARGS = [
    "--num-frames",
    "5",
    "--height",
    "32",
    "--width",
    "32",
    "--max-text-len",
    "8",
    "--steps",
    "6",
    "--rank",
    "4",
    "--buckets",
    "4",
    "--checkpoint-every",
    "3",
    "--no-progress",
    "--lr",
    "1e-4",
]


def test_train_cli_end_to_end_and_rerun_resumes(tmp_path, pipe_dir, capsys):
    write_clips(tmp_path / "data", layout="jsonl")
    out = tmp_path / "run"
    assert main(["--model", str(pipe_dir), "--data", str(tmp_path / "data"), "--output", str(out), *ARGS]) == 0
    assert len(list((out / "cache").glob("clip-*.safetensors"))) == 3
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(6))
    assert [r["rank"] for r in log] == [4, 4, 2, 2, 1, 1]  # ranks 4→2→1 over 3 phases of 6 // 3 steps
    model = load_quantized_model(out / "transformer")
    assert isinstance(model.blocks[0].attn1.to_q, PackedLinear) and model.blocks[0].attn1.to_q.rank == 0
    smooth = model.blocks[0].attn1.to_q.smooth  # the default transform, calibrated on the training clips
    assert smooth is not None and not torch.allclose(smooth, torch.ones_like(smooth))
    x = torch.randn(1, 4, 2, 4, 4)
    y = model(x, torch.tensor([500.0]), torch.randn(1, 8, 32), return_dict=False)[0]
    assert y.shape == x.shape and torch.isfinite(y).all()
    # the same command again: every stage is already done, training resumes at its end
    assert main(["--model", str(pipe_dir), "--output", str(out), *ARGS]) == 0
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize("layout", ["txt", "jsonl", "csv"])
def test_caption_layouts(tmp_path, layout):
    write_clips(tmp_path, n=2, layout=layout)
    clips = discover(tmp_path)
    assert [c.caption for c in clips] == ["a red square moving right", "a green square moving right"]
    v = read_video(clips[0].path, 4, 16, 24)
    assert v.shape == (3, 4, 16, 24) and v.min() >= -1.0 and v.max() <= 1.0


def test_data_errors_are_clear(tmp_path, pipe_dir):
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no videos found"):
        discover(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.mp4").write_bytes(b"not a video")
    (bad / "x.txt").write_text("caption")
    with pytest.raises(DataError, match=r"x\.mp4: cannot read video"):
        read_video(discover(bad)[0].path, 4, 16, 16)
    (bad / "y.mp4").write_bytes(b"")
    with pytest.raises(DataError, match=r"y\.mp4: no caption"):
        discover(bad)
    rc = main(["--model", str(pipe_dir), "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "o"), *ARGS])
    assert rc == 2
