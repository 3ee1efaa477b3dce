"""`python -m qvgen.bench step` on CPU: the reduced Wan model's rows and the records' schema."""

from __future__ import annotations

import json

import pytest
import torch

from qvgen.bench.__main__ import main
from qvgen.bench.step import CASES, RECORD_KEYS, SCHEMA, WAN_CONFIGS, build_model, tokens_of, weights_gib

pytest.importorskip("diffusers")


def test_token_counts_of_the_issue_cases() -> None:
    """480p and 720p at 81 frames are Wan's 32,760 and 75,600 tokens."""
    assert (tokens_of(CASES["480p"]), tokens_of(CASES["720p"])) == (32760, 75600)


def test_real_configs_build_on_meta_with_wan_sizes() -> None:
    """The full-size configs give Wan 2.1's parameter counts (1.3B, 14B), built without memory."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    from qvgen.bench.step import _config

    with init_empty_weights():
        counts = {m: sum(p.numel() for p in WanTransformer3DModel(**_config(m)).parameters()) for m in ("1.3b", "14b")}
    assert 1.3e9 < counts["1.3b"] < 1.5e9 and 13.5e9 < counts["14b"] < 15e9, counts


@pytest.mark.slow  # a bench run: builds and steps the reduced model twice (~10 s on 2 busy cores)
def test_step_records_on_cpu(tmp_path, capsys) -> None:
    out = tmp_path / "step-cpu.json"
    assert main(["step", "--device", "cpu", "--reps", "1", "--attention-8bit", "sage", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["schema"] == SCHEMA
    recs = data["records"]
    assert [(r["variant"], r["attention"]) for r in recs][:2] == [("bf16", "native"), ("w4a4", "native")]
    for r in recs:
        assert set(RECORD_KEYS) <= set(r)
        assert r["model"] == "reduced" and r["tokens"] == tokens_of(CASES["cpu"]) and r["gpu"] == "cpu"
        assert r["step_ms"] > 0 and r["speedup_vs_bf16"] > 0 and r["peak_gib"] is None
    bf16, w4a4 = recs[0], recs[1]
    assert bf16["sdpa_kernel"] in (None, "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH", "CUDNN_ATTENTION")
    assert data["runs"][0]["models"] == ["reduced"]
    assert bf16["speedup_vs_bf16"] == 1.0 and w4a4["weights_gib"] < bf16["weights_gib"]
    # an 8-bit attention backend that is not installed is a skipped row with its reason, not a failure
    try:
        import sageattention  # noqa: F401
    except ImportError:
        assert {s["attention"] for s in data["skipped"]} == {"sage"}
        assert all("sage" in s["reason"].lower() for s in data["skipped"])
    # a second invocation (bench_gpu.sh: one per model) adds its run and rows to the same file
    assert main(["step", "--device", "cpu", "--reps", "1", "--variants", "bf16", "--attention-8bit", "none",
                 "--out", str(out), "--append"]) == 0  # fmt: skip
    both = json.loads(out.read_text())
    assert len(both["runs"]) == 2 and both["records"][: len(recs)] == recs and len(both["records"]) == len(recs) + 1


def test_weights_only_on_meta(capsys) -> None:
    """`--weights-only`: both variants' weight memory without allocating (meta device)."""
    assert main(["step", "--weights-only", "--models", "reduced"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("reduced bf16: weights") and "× bf16" in lines[1]
    ratio = float(lines[1].split("(")[1].split("×")[0])
    assert 0 < ratio < 1


def test_w4a4_model_quantizes_every_block_linear_and_runs() -> None:
    from qvgen import PackedLinear

    model = build_model("reduced", "w4a4", torch.device("cpu"), torch.bfloat16)
    packed = [n for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    per_block = [n for n in packed if n.startswith("blocks.0.")]
    assert len(per_block) == 10  # self-attn q/k/v/out, cross-attn q/k/v/out, ffn up/down
    assert weights_gib(model) > 0 and WAN_CONFIGS["reduced"]["num_layers"] == 2
    x = torch.randn(1, 16, *CASES["cpu"], dtype=torch.bfloat16)
    e = torch.randn(1, 8, WAN_CONFIGS["reduced"]["text_dim"], dtype=torch.bfloat16)
    with torch.inference_mode():
        y = model(x, torch.tensor([500.0]), e, return_dict=False)[0]
    assert y.shape == x.shape and torch.isfinite(y).all()
