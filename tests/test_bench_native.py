"""`python -m qvgen.bench native`: every ComfyUI-native format's layer timed beside the float layer.

Speed is not asserted (it is a benchmark); what is: each format gets a row with its route, the
route computes what our dequantized layer computes, and its quantization error is that of a 4-bit
layer (above 0, well below the output's own size).
"""

from __future__ import annotations

import json

import pytest

from qvgen.bench.__main__ import main
from qvgen.bench.native import SCHEMES


def test_every_native_format_gets_a_row(tmp_path):
    out = tmp_path / "native.json"
    args = ["native", "--device", "cpu", "--shapes", "256x128,64x64", "--tokens", "8", "--min-time", "0"]
    assert main([*args, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["machine"]["device"] == "cpu"
    timed = [r for r in data["rows"] if "skipped" not in r]
    assert sorted(r["scheme"] for r in timed if r["k"] == 256) == sorted(SCHEMES)
    for r in timed:
        assert r["route"].startswith("qvgen dequantized")  # no GPU: never comfy-kitchen's kernels
        assert r["gap_to_ours"] == 0.0  # the same layer's forward, twice
        assert 0.0 < r["error_vs_float"] < 0.5, r
        assert r["float_ms"] > 0 and r["native_ms"] > 0 and r["speedup"] > 0
    skipped = {r["scheme"]: r["skipped"] for r in data["rows"] if "skipped" in r}
    assert skipped and all(r["k"] == 64 for r in data["rows"] if "skipped" in r)  # K = 64 fits no rotation group


def test_unknown_scheme_is_refused_by_name():
    with pytest.raises(SystemExit, match="unknown \\['int3'\\]"):
        main(["native", "--device", "cpu", "--schemes", "int3", "--shapes", "256x128", "--tokens", "8"])
