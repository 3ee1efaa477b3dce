"""`python -m qvgen.bench kernels` runs end to end on CPU (tiny shapes) and writes its JSON."""

from __future__ import annotations

import json

from qvgen.bench.__main__ import build_parser, main


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
        assert abs(r["speedup"] - r["baseline_ms"] / r["ours_ms"]) < 1e-9
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
