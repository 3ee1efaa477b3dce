"""`python -m qvgen.eval` on a tiny Wan transformer: the metrics against independent computations, the
per-layer table finding a damaged layer, and the CLI's files (checkpoint folder + diffusers original)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from tiny_models import tiny_wan

from qvgen.api import load_quantized_model, save_quantized
from qvgen.config import QVGenConfig
from qvgen.eval import evaluate, psnr, ssim
from qvgen.eval.cli import main
from qvgen.surgery import convert_model

SHAPE = (4, 3, 8, 8)
DAMAGED = "blocks.1.ffn.net.2"


# ---------------------------------------------------------------------------------------------
# frame metrics
# ---------------------------------------------------------------------------------------------
def _ssim_naive(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """SSIM written out window by window (Wang et al. 2004), the reference for the convolutional version."""
    x = np.arange(11) - 5.0
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for ch in range(a.shape[0]):
        for f in range(a.shape[1]):
            for i in range(a.shape[2] - 10):
                for j in range(a.shape[3] - 10):
                    pa, pb = a[ch, f, i : i + 11, j : j + 11], b[ch, f, i : i + 11, j : j + 11]
                    ma, mb = (w * pa).sum(), (w * pb).sum()
                    va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                    cov = (w * (pa - ma) * (pb - mb)).sum()
                    vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_window_by_window_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 2, 15, 14, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    expected = _ssim_naive(a.double().numpy(), b.double().numpy(), 2.0)
    assert ssim(a, b, 2.0) == pytest.approx(expected, rel=1e-9)  # float64 both ways
    assert ssim(a, a, 2.0) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, b, 2.0) < 0.9


def test_psnr_of_a_known_error():
    a = torch.zeros(3, 2, 8, 8)
    assert psnr(a + 0.1, a, 2.0) == pytest.approx(10 * math.log10(4 / 0.01))
    assert psnr(a, a, 2.0) == math.inf


# ---------------------------------------------------------------------------------------------
# the comparison on a tiny model
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    """The original, its W4A4 RTN quantization, and a copy of that with one deliberately bad layer."""
    original = tiny_wan().eval()
    quantized = copy.deepcopy(original)
    convert_model(quantized, QVGenConfig(rank=0, n_buckets=4), progress=False)
    damaged = copy.deepcopy(quantized)
    with torch.no_grad():  # its weights 30% too large
        damaged.get_submodule(DAMAGED).weight.mul_(1.3)
    return original, damaged.eval(), quantized.eval()


def _embeds(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 5, 32, generator=torch.Generator().manual_seed(7))


def test_velocity_error_per_step_is_the_teacher_forced_error(models):
    original, quantized, _ = models
    r = evaluate(original, quantized, _embeds(), [0, 1], SHAPE, num_steps=3, one_at_a_time=False, progress=False)
    assert [s["step"] for s in r["velocity_per_step"]] == [0, 1, 2]
    # step 0 of every trajectory is the pure seeded noise at t = 1000: recompute it directly
    direct = []
    with torch.no_grad():
        for i, seed in enumerate([0, 1]):
            x = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(seed))
            kw = dict(hidden_states=x, timestep=torch.full((1,), 1000.0), encoder_hidden_states=_embeds()[i : i + 1])
            v, vq = original(**kw, return_dict=False)[0], quantized(**kw, return_dict=False)[0]
            direct.append(float((vq - v).pow(2).mean()))
    first = r["velocity_per_step"][0]
    assert first["velocity_mse"] == pytest.approx(sum(direct) / 2, rel=1e-5)
    assert first["timestep"] == 1000.0 and r["velocity_per_step"][-1]["sigma"] == pytest.approx(1 / 3)
    assert r["velocity_mse_mean"] == pytest.approx(np.mean([s["velocity_mse"] for s in r["velocity_per_step"]]))
    assert r["frames"] is None  # latent model, no decoder: no frame metrics


def test_layer_table_finds_the_damaged_layer(models):
    original, damaged, intact = models
    # one step: the one-layer-at-a-time pass runs at t = 1000 only (one forward per layer)
    tables = [evaluate(original, m, _embeds(1), [0], SHAPE, num_steps=1, progress=False)["layers"] for m in models[1:]]
    rows, rows_intact = ({r["layer"]: r for r in t} for t in tables)
    alone = [r["velocity_mse_alone"] for r in tables[0]]
    assert alone == sorted(alone, reverse=True)  # sorted by the error each layer causes alone
    assert max(rows.values(), key=lambda r: r["output_rel_error"])["layer"] == DAMAGED
    # the damage shows in both measures of that layer (a 30% weight error against ~1% from 4-bit rounding)
    assert rows[DAMAGED]["output_rel_error"] > 3 * rows_intact[DAMAGED]["output_rel_error"]
    assert rows[DAMAGED]["velocity_mse_alone"] > 3 * rows_intact[DAMAGED]["velocity_mse_alone"]
    # and only there: another layer, fed the original's inputs, is unaffected
    assert rows["proj_out"] == rows_intact["proj_out"]
    assert len(rows) == sum(isinstance(m, torch.nn.Linear) for m in original.modules())


def test_pixel_space_frames_metrics(models):
    original, quantized, _ = models
    r = evaluate(original, quantized, _embeds(1), [3], SHAPE, num_steps=2, pixel_range=2.0, one_at_a_time=False)
    f = r["frames"]
    assert 0 < f["ssim"] < 1 and f["psnr_db"] > 0 and f["per_prompt"][0]["seed"] == 3
    assert "velocity_mse_alone" not in r["layers"][0]


def test_cli_on_checkpoint_folder_and_diffusers_original(models, tmp_path):
    original, quantized, _ = models
    original.save_pretrained(tmp_path / "original")
    save_quantized(quantized, QVGenConfig(rank=0, n_buckets=4), tmp_path / "ckpt", dtype=torch.float32)
    assert load_quantized_model(tmp_path / "ckpt") is not None
    out = tmp_path / "eval"
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--original", str(tmp_path / "original")]
    args += ["--latent-shape", "4,3,8,8", "--steps", "2", "--num-prompts", "1", "--output", str(out), "--no-progress"]
    args += ["--no-one-at-a-time"]
    assert main(args) == 0
    r = json.loads((out / "eval.json").read_text())
    assert (out / "eval.png").stat().st_size > 1000
    worst = max(r["layers"], key=lambda row: row["output_rel_error"])
    assert worst["layer"] == DAMAGED  # the packed model's layer, exported from the damaged student
    assert len(r["velocity_per_step"]) == 2 and r["environment"]["argv"] == args


def test_max_layers_caps_the_one_at_a_time_pass(models):
    """Only the `max_layers` layers with the largest own output error get the one-layer-at-a-time
    forward passes; they lead the table, the rest follow by their own error."""
    original, quantized, _ = models
    full = evaluate(original, quantized, _embeds(1), [0], SHAPE, num_steps=1, progress=False)["layers"]
    capped = evaluate(original, quantized, _embeds(1), [0], SHAPE, num_steps=1, max_layers=2, progress=False)["layers"]
    by_own = sorted(full, key=lambda r: -r["output_rel_error"])
    measured = [r for r in capped if "velocity_mse_alone" in r]
    assert {r["layer"] for r in measured} == {r["layer"] for r in by_own[:2]} and capped[:2] == measured
    assert [r["output_rel_error"] for r in capped[2:]] == sorted(
        (r["output_rel_error"] for r in capped[2:]), reverse=True
    )
    alone = {r["layer"]: r["velocity_mse_alone"] for r in full}
    assert all(r["velocity_mse_alone"] == alone[r["layer"]] for r in measured)  # same passes, same values
    assert (
        "velocity_mse_alone"
        not in evaluate(original, quantized, _embeds(1), [0], SHAPE, num_steps=1, max_layers=0, progress=False)[
            "layers"
        ][0]
    )
