"""End to end on a CUDA GPU (marked `gpu`, skipped without one): the packed model through the
Triton kernels against the fake-quant model, for every input transform; QAT training with bf16
autocast and gradient checkpointing; and the exported checkpoint running on the GPU.

Tolerance (packed vs fake-quant, both fp32 on the GPU): median |Δ| ≤ 1e-4 and relative L2 gap
≤ 1e-2. The integer GEMM is exact; what differs is float summation order in the scale epilogue
and the fake-quant's float matmul, which flips an occasional 4-bit rounding downstream. A wrong
scale, zero point or transform gives a relative gap above 1e-1.
"""

from __future__ import annotations

import json

import pytest
import torch
from qvgen_kernels.backend import resolve_backend
from tiny_models import tiny_wan, tiny_wan_pipeline, wan_inputs, write_clips

from qvgen import PackedLinear, QVGenConfig, convert_model, load_quantized_model, pack_model
from qvgen.surgery import calibrate_smoothing
from qvgen.widen import widen_weights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _rel_gap(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (out.float() - ref.float()).abs()
    return float(diff.median()), float(diff.norm() / ref.float().norm())


@pytest.mark.parametrize("transform", ["none", "hadamard", "smooth", "smooth_hadamard"])
@pytest.mark.parametrize("rank", [0, 4])
def test_packed_triton_matches_fake_quant(transform: str, rank: int) -> None:
    model = tiny_wan().cuda()
    cfg = QVGenConfig(rank=rank, n_buckets=4, input_transform=transform)
    x, t, e = (v.cuda() for v in wan_inputs())
    convert_model(model, cfg, progress=False)
    if "smooth" in transform:
        calibrate_smoothing(model, lambda m: m(x, t, e, return_dict=False), cfg.smooth_alpha)
    with torch.no_grad():
        ref = model(x, t, e, return_dict=False)[0]
        pack_model(model, cfg)
        packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
        assert packed
        for m in packed:
            m.backend = "triton"  # fail rather than fall back
        out = model(x, t, e, return_dict=False)[0]
    median, rel = _rel_gap(out, ref)
    assert median <= 1e-4 and rel <= 1e-2, (median, rel)
    with torch.no_grad():  # widened weights: the same integers, so the same outputs (to fp32 rounding)
        widen_weights(model)
        wide = model(x, t, e, return_dict=False)[0]
    assert float((wide - out).abs().max()) <= 1e-6 * float(out.abs().max())


def test_train_on_cuda_exports_a_model_that_runs_on_cuda(tmp_path) -> None:
    from qvgen.train.cli import main

    pipe_dir = tmp_path / "tiny-wan"
    tiny_wan_pipeline().save_pretrained(pipe_dir)
    write_clips(tmp_path / "data", layout="jsonl")
    out = tmp_path / "run"
    args = ["--num-frames", "5", "--height", "32", "--width", "32", "--max-text-len", "8", "--steps", "6"]
    args += ["--rank", "4", "--buckets", "4", "--checkpoint-every", "3", "--no-progress", "--device", "cuda"]
    assert main(["--model", str(pipe_dir), "--data", str(tmp_path / "data"), "--output", str(out), *args]) == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    model = load_quantized_model(out / "transformer", dtype=torch.bfloat16, device="cuda")
    assert resolve_backend("auto", "cuda") == "triton"
    x = torch.randn(1, 4, 2, 4, 4, device="cuda", dtype=torch.bfloat16)
    e = torch.randn(1, 8, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = model(x, torch.tensor([500.0], device="cuda"), e, return_dict=False)[0]
    assert y.shape == x.shape and torch.isfinite(y).all()
