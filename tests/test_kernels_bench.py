"""`python -m qvgen.bench kernels` runs end to end on CPU (tiny shapes) and writes its JSON."""

from __future__ import annotations

import json

import torch

from qvgen.bench.__main__ import build_parser, main
from qvgen.bench.kernels import time_ms


def test_bench_kernels_cli(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    argv = ["kernels", "--device", "cpu", "--shapes", "64x48,33x16", "--tokens", "5,8", "--min-time", "0"]
    assert main([*argv, "--no-comfy", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| model | layer | M | K | N |" in table and "W4A4 (cpu) ms" in table
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(r["k"], r["n"], r["m"]) for r in rows] == [(64, 48, 5), (64, 48, 8), (33, 16, 5), (33, 16, 8)]
    for r in rows:
        assert r["baseline_ms"] > 0 and r["ours_ms"] > 0
        assert "bf16 linear" in r["extra_ms"] and "act quant" in r["extra_ms"]
    assert data["machine"]["device"] == "cpu" and data["label"] == "W4A4 (cpu)"


def test_bench_weight_only_and_subcommand_registry(capsys) -> None:
    args = ["kernels", "--device", "cpu", "--shapes", "32x16", "--tokens", "4", "--min-time", "0", "--no-comfy"]
    assert main([*args, "--a-bits", "none", "--w-bits", "8", "--no-bf16"]) == 0
    assert "W8A16 (cpu) ms" in capsys.readouterr().out
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "kernels" in sub.choices


def test_bench_transform_cost_column(capsys) -> None:
    args = ["kernels", "--device", "cpu", "--shapes", "96x16", "--tokens", "4", "--min-time", "0", "--no-comfy"]
    assert main([*args, "--transform", "smooth_hadamard", "--no-bf16"]) == 0
    out = capsys.readouterr().out
    assert "smooth_hadamard cost %" in out and "no transform ms" in out


def test_time_ms_interleaves_and_repeats() -> None:
    """The functions are timed round-robin (so load drift hits each alike), each warmed up once and
    timed at least three times even with no minimum time; a function that is done stops running."""
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    ms = time_ms(fns, torch.device("cpu"), min_time=0.0)
    assert set(ms) == {"a", "b", "c"} and all(v >= 0 for v in ms.values())
    assert calls == ["a", "b", "c"] * 4  # warm-up, then three interleaved rounds


def test_device_time_records_schema_on_cpu(tmp_path, capsys) -> None:
    """`--device-time` on CPU: one record per layer × tokens and per block pair × tokens, with the
    fields of issue #13, wall timing (no CUDA), the vendor ceilings named (a time or null)."""
    from qvgen.bench.kernel_records import RECORD_KEYS, SCHEMA

    out = tmp_path / "kernels-cpu.json"
    argv = ["kernels", "--device-time", "--device", "cpu", "--models", "tiny", "--tokens", "17,32"]
    assert main([*argv, "--min-time", "0", "--out", str(out)]) == 0
    assert "block ffn up+gelu → down" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["schema"] == SCHEMA
    recs = data["records"]
    layers = [r["layer"] for r in recs]
    assert layers == [name for name in ("attn q/k/v/o", "ffn up", "ffn down", "text proj") for _ in (17, 32)] + [
        name for name in ("block norm+mod → qkv", "block ffn up+gelu → down") for _ in (17, 32)
    ]
    for r in recs:
        assert set(RECORD_KEYS) <= set(r)
        assert r["timing"] == "wall" and r["gpu"] == "cpu" and r["torch"] == torch.__version__
        assert r["model"] == "tiny" and r["M"] in (17, 32)
        assert r["baseline_ms"] > 0 and r["ours_ms"] > 0 and r["speedup"] > 0
        assert r["host_ms"] is None  # host overhead is a CUDA measurement
    by_layer = {(r["layer"], r["M"]): r for r in recs}
    assert (by_layer[("ffn up", 17)]["K"], by_layer[("ffn up", 17)]["N"]) == (64, 160)
    assert (by_layer[("block norm+mod → qkv", 17)]["K"], by_layer[("block norm+mod → qkv", 17)]["N"]) == (64, 192)
    layer_rows = [r for r in recs if not r["layer"].startswith("block")]
    ceilings = {"int_mm int8", "scaled_mm fp8 rowwise"}
    assert all(r["quant_ms"] > 0 and set(r["ceilings_ms"]) == ceilings for r in layer_rows)
