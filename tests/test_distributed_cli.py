"""`accelerate launch -m qvgen.train` with an FSDP config, on 2 CPU processes: no code changes, one export."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_wan_pipeline, write_clips

from qvgen import PackedLinear, load_quantized_model

pytestmark = pytest.mark.slow  # launches 2 processes through accelerate
REPO = Path(__file__).resolve().parents[1]
FSDP_ZERO2_CPU = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_reshard_after_forward: false
  fsdp_offload_params: false
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
"""
ARGS = "--num-frames 5 --height 32 --width 32 --max-text-len 8 --steps 6 --rank 4 --buckets 4 --checkpoint-every 3"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_fsdp_trains_and_exports_once(tmp_path):
    pipe = tmp_path / "tiny-wan"
    tiny_wan_pipeline().save_pretrained(pipe)
    write_clips(tmp_path / "data", layout="jsonl")
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_ZERO2_CPU)
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--main_process_port", str(_free_port()), "-m", "qvgen.train",
        "--model", str(pipe), "--data", str(tmp_path / "data"), "--output", str(out), *ARGS.split(),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-8000:]
    # the accelerate config chose the engine; rank 0 alone reports and shows progress
    assert text.count("QVGen training on 2 processes: FSDP2 shard-grad-op (ZeRO-2)") == 1
    assert "from accelerate config (FSDP)" in text
    assert text.count("Memory estimate per process (2 processes)") == 1
    assert text.count("QVGen checkpoint written to") == 1
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(6))
    assert [r["rank"] for r in log] == [4, 4, 2, 2, 1, 1]
    assert json.loads((out / "train_config.json").read_text())["world_size"] == 2
    model = load_quantized_model(out / "transformer")
    assert isinstance(model.blocks[0].attn1.to_q, PackedLinear) and model.blocks[0].attn1.to_q.rank == 0
