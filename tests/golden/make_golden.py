"""Writes the golden checkpoint every future QVGen must still load (run once per format version).

    python tests/golden/make_golden.py

A tiny Wan (2 blocks, hidden 64) converted with every per-layer feature of the format in use: 4-bit
weights and activations, smoothing + Hadamard input transform, Φ kept at rank 2, 4 clip buckets; one
layer left in full precision. Besides the checkpoint it stores the inputs and the output of the packed
model's PyTorch path at write time, so later releases are held to the same numbers, not only to loading.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tiny_models import tiny_wan, wan_inputs  # noqa: E402

from qvgen import QVGenConfig, convert_model, load_quantized_model, pack_model, save_quantized  # noqa: E402
from qvgen.config import FORMAT_VERSION  # noqa: E402

NAME = f"tiny_wan_w4a4_v{FORMAT_VERSION}"


def main() -> None:
    model = tiny_wan()
    cfg = QVGenConfig(
        rank=2, n_buckets=4, input_transform="smooth_hadamard", hadamard_block=32, modules_to_not_convert=["proj_out"]
    )
    x, t, e = wan_inputs(batch=1)

    def calibrate(m):
        m(x, t, e, return_dict=False)

    convert_model(model, cfg, progress=False, calibrate=calibrate)
    pack_model(model, cfg)
    path = save_quantized(model, cfg, HERE / f"{NAME}.safetensors", dtype=torch.float32)
    reloaded = load_quantized_model(path).eval()
    with torch.no_grad():
        y = reloaded(x, t, e, return_dict=False)[0]
    save_file({"x": x, "t": t, "e": e, "y": y}, str(HERE / f"{NAME}.io.safetensors"))
    print(f"wrote {path.name} ({path.stat().st_size / 1024:.0f} KiB) and {NAME}.io.safetensors")


if __name__ == "__main__":
    main()
