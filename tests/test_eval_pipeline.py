"""`python -m qvgen.eval --pipeline` on tiny Wan and CogVideoX pipelines built in code: the per-step error
against the transformer calls recorded independently, the identical-model case, PSNR against sampling
the pipeline by hand, and the CLI's files (checkpoint folder, RTN PTQ, `--prompt-embeds`)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_cogvideox_pipeline, tiny_wan_pipeline

from qvgen.api import load_quantized_model, save_quantized
from qvgen.config import QVGenConfig
from qvgen.eval import evaluate_pipeline
from qvgen.eval.cli import main
from qvgen.surgery import convert_model, quantized_layers

WAN_CALL = {"height": 32, "width": 32, "num_frames": 5, "max_sequence_length": 16}  # 2 latent frames of 4×4
PROMPTS = ["a red circle moving left", "a blue square moving up"]
CONFIG = QVGenConfig(rank=0, n_buckets=4)


@pytest.fixture(scope="module")
def wan():
    """The tiny Wan pipeline and its transformer's W4A4 RTN quantization."""
    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    quantized = copy.deepcopy(pipe.transformer)
    convert_model(quantized, CONFIG, progress=False)
    return pipe, quantized.eval()


@pytest.fixture(scope="module")
def wan_folder(wan, tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan") / "pipe"
    wan[0].save_pretrained(folder)
    return folder


def _frames(pipe, prompt: str, seed: int, **call) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    out = pipe(prompt=prompt, generator=g, output_type="np", **call)
    return np.asarray(out.frames[0], dtype=np.float64)


def test_identical_transformer_gives_zero_error_and_infinite_psnr(wan):
    """A copy of the original computes the same float operations on the same inputs in the same
    process, so every output is bitwise equal: exactly zero error, PSNR infinite, SSIM 1. (The pipeline
    is built in train mode: this also checks that the text encoder's dropout is off for both runs.)"""
    pipe, _ = wan
    same = copy.deepcopy(pipe.transformer)
    r = evaluate_pipeline(pipe, same, [{"prompt": PROMPTS[0]}], [0], num_steps=2, call=WAN_CALL, progress=False)
    assert [s["velocity_mse"] for s in r["velocity_per_step"]] == [0.0, 0.0]
    assert r["frames"]["psnr_db"] == math.inf
    assert r["frames"]["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert r["layers"] == []  # no quantized layers: no per-layer table
    assert pipe.transformer is not same and "forward" not in vars(pipe.transformer)  # pipeline left as it was


def test_error_per_step_is_the_mean_over_the_originals_transformer_calls(wan):
    """Guidance 2: Wan calls its transformer twice per step (cond, uncond). Recorded here by a hook on
    a plain pipeline run and replayed through the quantized model, grouped by timestep."""
    pipe, quantized = wan
    call = {**WAN_CALL, "guidance_scale": 2.0}
    r = evaluate_pipeline(
        pipe, quantized, [{"prompt": PROMPTS[0]}], [3], num_steps=2, call=call, one_at_a_time=False, progress=False
    )
    calls: list[dict] = []
    handle = pipe.transformer.register_forward_pre_hook(lambda _m, _a, kw: calls.append(dict(kw)), with_kwargs=True)
    try:
        _frames(pipe, PROMPTS[0], 3, num_inference_steps=2, **call)
    finally:
        handle.remove()
    assert len(calls) == 4
    by_step: dict[float, list[float]] = {}
    with torch.no_grad():
        for kw in calls:
            v, vq = pipe.transformer(**kw)[0], quantized(**kw)[0]
            by_step.setdefault(float(kw["timestep"][0]), []).append(float((vq - v).pow(2).mean()))
    steps = r["velocity_per_step"]
    assert [s["timestep"] for s in steps] == list(by_step)
    for s, errors in zip(steps, by_step.values(), strict=True):
        assert s["velocity_mse"] == pytest.approx(np.mean(errors), rel=1e-5)  # same calls, same arithmetic
        assert s["velocity_mse"] > 0
    assert 0 < r["frames"]["ssim"] < 1 and math.isfinite(r["frames"]["psnr_db"])
    assert {row["layer"] for row in r["layers"]} == set(quantized_layers(quantized))


def test_wan_cli_with_checkpoint_frames_psnr_matches_sampling_by_hand(wan, wan_folder, tmp_path):
    pipe, quantized = wan
    save_quantized(quantized, CONFIG, tmp_path / "ckpt", dtype=torch.float32)
    out = tmp_path / "eval"
    args = ["--pipeline", str(wan_folder), "--checkpoint", str(tmp_path / "ckpt"), "--prompts", PROMPTS[1]]
    args += ["--size", "32,32", "--num-frames", "5", "--max-sequence-length", "16", "--steps", "2", "--seeds", "7"]
    args += ["--max-layers", "2", "--output", str(out), "--no-progress"]
    assert main(args) == 0
    r = json.loads((out / "eval.json").read_text())
    assert set(r) == {
        *("quantized", "original", "pipeline", "prompts", "pipeline_arguments", "seeds", "num_steps"),
        *("velocity_mse_mean", "velocity_per_step", "layers", "frames", "environment"),
    }
    assert r["pipeline_arguments"] == WAN_CALL and set(r["frames"]) == {"psnr_db", "ssim", "per_prompt"}
    assert r["pipeline"] == "WanPipeline" and r["prompts"] == PROMPTS[1:] and r["seeds"] == [7]
    assert r["quantized"] == str(tmp_path / "ckpt") and r["environment"]["argv"] == args
    assert (out / "eval.png").stat().st_size > 1000 and (out / "frames.png").stat().st_size > 1000
    assert len(r["velocity_per_step"]) == 2 and r["velocity_mse_mean"] > 0
    # the one-layer-at-a-time pass covers the two layers with the largest own error, listed first
    measured = [row for row in r["layers"] if "velocity_mse_alone" in row]
    own = sorted((row["output_rel_error"] for row in r["layers"]), reverse=True)
    assert len(measured) == 2 and r["layers"][:2] == measured
    assert sorted(row["output_rel_error"] for row in measured) == sorted(own[:2])
    # PSNR written out from frames sampled here by the pipeline itself, with each transformer
    base = type(pipe).from_pretrained(wan_folder)
    base.set_progress_bar_config(disable=True)
    call = {**WAN_CALL, "num_inference_steps": 2}
    a = _frames(base, PROMPTS[1], 7, **call)
    base.transformer = load_quantized_model(tmp_path / "ckpt")
    b = _frames(base, PROMPTS[1], 7, **call)
    expected = 10 * math.log10(1.0 / np.mean((a - b) ** 2))  # frames in [0, 1]
    assert r["frames"]["psnr_db"] == pytest.approx(expected, rel=1e-6)
    assert r["frames"]["per_prompt"][0]["psnr_db"] == r["frames"]["psnr_db"]


def test_wan_cli_with_a_comfyui_native_export(wan, wan_folder, tmp_path):
    """`--checkpoint` may be a ComfyUI-native single file (here W4A8, whose layers run without comfy-kitchen)."""
    from qvgen.adapters.comfy.native import export_comfy

    pipe, _ = wan
    student = copy.deepcopy(pipe.transformer)
    cfg = QVGenConfig(scheme="w4a8_int8", act_bits=8, rank=0, n_buckets=1)
    convert_model(student, cfg, progress=False)
    path = export_comfy(student, cfg, tmp_path / "wan-w4a8.safetensors", dtype=torch.float32).path
    out = tmp_path / "eval"
    args = ["--pipeline", str(wan_folder), "--checkpoint", str(path), "--size", "32,32", "--num-frames", "5"]
    args += ["--max-sequence-length", "16", "--steps", "2", "--num-prompts", "1", "--guidance-scale", "1"]
    args += ["--no-one-at-a-time", "--output", str(out), "--no-progress"]
    assert main(args) == 0
    r = json.loads((out / "eval.json").read_text())
    assert {row["layer"] for row in r["layers"]} == set(quantized_layers(student))
    assert all(s["velocity_mse"] > 0 for s in r["velocity_per_step"]) and r["frames"]["psnr_db"] > 0


@pytest.fixture(scope="module")
def cogvideox_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cogvideox")
    tiny_cogvideox_pipeline().save_pretrained(folder / "pipe")
    g = torch.Generator().manual_seed(5)
    embeds = {"prompt_embeds": torch.randn(2, 16, 32, generator=g)}
    save_file(embeds, folder / "positive.safetensors")
    save_file({**embeds, "negative_prompt_embeds": torch.zeros(2, 16, 32)}, folder / "embeds.safetensors")
    return folder


def test_cogvideox_cli_rtn_ptq_with_prompt_embeds(cogvideox_folder, tmp_path):
    """No text encoder loaded; the pipeline's default guidance (6) batches cond and uncond in one call."""
    out = tmp_path / "eval"
    args = [
        "--pipeline",
        str(cogvideox_folder / "pipe"),
        "--prompt-embeds",
        str(cogvideox_folder / "embeds.safetensors"),
    ]
    args += ["--steps", "2", "--seeds", "4,5", "--keep", "proj_out", "--no-one-at-a-time", "--output", str(out)]
    assert main([*args, "--no-progress"]) == 0
    r = json.loads((out / "eval.json").read_text())
    assert r["pipeline"] == "CogVideoXPipeline"
    assert r["quantized"] == "pipeline transformer, W4A4 round-to-nearest PTQ, proj_out kept in full precision"
    assert "proj_out" not in {row["layer"] for row in r["layers"]}
    assert r["prompts"] is None and [f["seed"] for f in r["frames"]["per_prompt"]] == [4, 5]
    assert all(s["velocity_mse"] > 0 for s in r["velocity_per_step"]) and len(r["velocity_per_step"]) == 2
    assert 0 < r["frames"]["ssim"] < 1 and r["frames"]["psnr_db"] > 0
    assert r["layers"] and all("velocity_mse_alone" not in row for row in r["layers"])
    assert (out / "eval.png").is_file() and (out / "frames.png").is_file()


def test_pipeline_input_errors_name_the_file_and_what_is_expected(cogvideox_folder, tmp_path):
    pipe = ["--pipeline", str(cogvideox_folder / "pipe"), "--output", str(tmp_path), "--no-progress"]
    with pytest.raises(SystemExit, match="positive.safetensors: guidance scale 6 needs a 'negative_prompt_embeds'"):
        main([*pipe, "--prompt-embeds", str(cogvideox_folder / "positive.safetensors")])
    save_file({"embeds": torch.zeros(1, 16, 32)}, tmp_path / "wrong.safetensors")
    with pytest.raises(SystemExit, match="wrong.safetensors: expected a \\(B, L, D\\) tensor named 'prompt_embeds'"):
        main([*pipe, "--prompt-embeds", str(tmp_path / "wrong.safetensors")])
    with pytest.raises(SystemExit, match="--pipeline org/not-cached: .*nothing is downloaded"):
        main(["--pipeline", "org/not-cached", "--output", str(tmp_path), "--no-progress"])
