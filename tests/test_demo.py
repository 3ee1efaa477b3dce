"""The embedded demo end to end, at a tiny budget: every output file and metric is produced."""

from __future__ import annotations

import json

import pytest

from qvgen.demo import run
from qvgen.demo.teacher import TEACHER_PATH

pytestmark = pytest.mark.skipif(not TEACHER_PATH.is_file(), reason="demo teacher asset not built")


def test_demo_smoke(tmp_path):
    args = [
        "--output",
        str(tmp_path),
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--train-clips",
        "4",
        "--eval-clips",
        "2",
        "--prompts",
        "1",
        "--sample-steps",
        "2",
        "--rank",
        "4",
        "--no-progress",
    ]
    metrics = run.main(args)
    assert metrics == 0
    for name in ("comparison.gif", "comparison.png", "loss_curves.png", "metrics.json", "qvgen-demo-w4a4.safetensors"):
        assert (tmp_path / name).is_file(), name
    m = json.loads((tmp_path / "metrics.json").read_text())
    base = {"PTQ", "QAT", "QVGen"}
    assert set(m["methods"]) == base | {f"{b}+smooth" for b in base}  # the default grid: none and smooth
    for name, method in m["methods"].items():
        keys = ["velocity_mse", "velocity_mse_weights_only", "velocity_mse_acts_only"]
        for key in keys + (["sample_mse"] if name in base else []):
            assert method[key] >= 0
    assert m["methods"]["QVGen"]["phi_rank_over_training"][0] == [0, 4]
    ck = m["checkpoint"]
    assert ck["size_ratio_vs_bf16"] < 0.6
    # the reloaded integer model reproduces the fake-quant student (fp32 export, fp32 compute)
    # (single 4-bit rounding flips from float summation order compound over the blocks: ~1e-2 measured)
    assert ck["packed_vs_fake_quant_rel_err"] < 5e-2
