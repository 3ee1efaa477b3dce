"""The embedded demo: the default grid, what metrics.json records, and on a short run that training works
and that the exported integer model reproduces the fake-quant student."""

from __future__ import annotations

import json

import pytest

from qvgen.demo import run, summary
from qvgen.demo.teacher import TEACHER_PATH

needs_teacher = pytest.mark.skipif(not TEACHER_PATH.is_file(), reason="demo teacher asset not built")


def test_default_grid_and_seeds():
    args = run.build_parser().parse_args([])
    names = set(run._configs(args))
    base = {"PTQ", "QAT", "QVGen"}
    # the default grid: none and smooth; --schemes adds each ComfyUI-native scheme's PTQ / QAT / QVGen rows
    assert names == base | {f"{b}+smooth" for b in base}
    with_nvfp4 = run._configs(run.build_parser().parse_args(["--schemes", "nvfp4"]))
    assert set(with_nvfp4) == names | {f"{b} nvfp4" for b in base}
    assert with_nvfp4["QVGen nvfp4"].scheme == "nvfp4"
    assert args.seeds == [0]  # one seed by default: the default run stays within minutes
    assert run.build_parser().parse_args(["--seeds", "0,1,2"]).seeds == [0, 1, 2]
    with pytest.raises(SystemExit):
        run.build_parser().parse_args(["--seeds", "0,0"])


def test_aggregate_over_seeds():
    per_seed = {
        "0": {"methods": {"PTQ": {"velocity_mse": 0.02, "velocity_mse_vs_ptq": 1.0, "sample_mse": 0.5}}},
        "1": {"methods": {"PTQ": {"velocity_mse": 0.04, "velocity_mse_vs_ptq": 1.0}}},
    }
    m = summary.aggregate(per_seed)["PTQ"]
    assert m["velocity_mse"] == pytest.approx(0.03)
    assert m["velocity_mse_std"] == pytest.approx(0.02**0.5 * 0.1)  # sample std of {0.02, 0.04}
    assert m["velocity_mse_per_seed"] == [0.02, 0.04]
    assert m["velocity_mse_vs_ptq_std"] == 0.0
    assert m["sample_mse"] == 0.5  # first seed only (the pictures' seed)
    assert "0.03000 ± 0.01414" in summary.table({"methods": {"PTQ": m}})


@pytest.mark.slow
@needs_teacher
def test_short_demo_trains_and_reloads(tmp_path):
    """16 steps at a lower lr (5e-4 overshoots in so few steps): both trained students are closer to the
    teacher than RTN PTQ (measured 0.87× and 0.90×; asserted < 0.97×), and the packed checkpoint
    reproduces the fake-quant QVGen student."""
    args = ["--output", str(tmp_path), "--steps", "16", "--lr", "2e-4", "--batch-size", "2", "--train-clips", "32"]
    args += ["--eval-clips", "4", "--prompts", "1", "--sample-steps", "2", "--rank", "8", "--transforms", "none"]
    args += ["--schemes", "", "--no-progress"]  # the int4 per-token rows only: the scheme rows double the time
    assert run.main(args) == 0
    for name in ("comparison.gif", "comparison.png", "loss_curves.png", "metrics.json", "qvgen-demo-w4a4.safetensors"):
        assert (tmp_path / name).is_file(), name
    m = json.loads((tmp_path / "metrics.json").read_text())
    methods = m["methods"]
    assert set(methods) == {"PTQ", "QAT", "QVGen"}
    for trained in ("QAT", "QVGen"):
        assert methods[trained]["velocity_mse"] < 0.97 * methods["PTQ"]["velocity_mse"], trained
    # Φ halves every 16 // 4 steps (the log records the rank during each step; it reaches 0 after the last)
    assert methods["QVGen"]["phi_rank_over_training"] == [[0, 8], [4, 4], [8, 2], [12, 1]]
    env = m["environment"]
    assert env["argv"] == args and env["torch"] and env["cpu"] and env["python"]
    assert m["seeds"] == [0] and list(m["per_seed"]) == ["0"]
    ck = m["checkpoint"]
    assert ck["size_ratio_vs_bf16"] < 0.6
    # the reloaded integer model reproduces the fake-quant student (fp32 export, fp32 compute); single
    # 4-bit rounding flips from float summation order compound over the blocks (~1e-2 measured), while
    # a wrong scale, zero point or transform gives > 1e-1
    assert ck["packed_vs_fake_quant_rel_err"] < 5e-2
    assert ck["packed_velocity_mse"] == pytest.approx(methods["QVGen"]["velocity_mse"], rel=0.1)
