"""`python -m qvgen.bench train` on CPU: every method measured in its own process, ratios to FP fine-tuning."""

from __future__ import annotations

import json

import pytest

from qvgen.bench.train import Result, main, table


@pytest.mark.slow  # trains three tiny models for a few steps each (~50 s on 2 cores)
def test_bench_train_reports_time_and_memory_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--frames", "5", "--height", "64", "--width", "64", "--warmup", "1", "--steps", "2", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| method | trainable params | time / step (s) | × fp | peak memory | × fp |" in text
    assert "| FP fine-tuning (baseline) |" in text and "| LoRA-based QAT |" in text and "| QVGen QAT |" in text
    report = json.loads(out.read_text())
    assert report["setup"]["memory"] == "peak RSS (ru_maxrss)"
    res = {r["method"]: r for r in report["results"]}
    assert list(res) == ["fp", "lora", "qvgen"]
    for r in res.values():
        assert r["sec_per_step"] > 0 and r["peak_bytes"] > 0 and len(r["steps"]) == 2
    # LoRA trains only its low-rank factors; QVGen trains every weight plus quantizers and Φ
    assert res["lora"]["trainable_params"] < res["fp"]["trainable_params"] < res["qvgen"]["trainable_params"]
    assert res["lora"]["estimate_bytes"] < res["fp"]["estimate_bytes"] < res["qvgen"]["estimate_bytes"]


def test_table_ratios_are_against_the_first_row():
    rows = [
        Result("fp", "FP", 10, 0.5, 0.5, 2**20, 1, [0.5]),
        Result("qvgen", "QVGen", 12, 1.0, 1.0, 3 * 2**20, 2, [1.0]),
    ]
    lines = table(rows).splitlines()
    assert lines[2].split("|")[4].strip() == "1.00" and lines[3].split("|")[4].strip() == "2.00"
    assert lines[3].split("|")[6].strip() == "3.00"


def test_unknown_method_is_refused(capsys):
    assert main(["--methods", "fp,full"]) == 2
    assert "unknown ['full']" in capsys.readouterr().out
