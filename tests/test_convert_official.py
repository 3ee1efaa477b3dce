"""Import of the QVGen authors' fake-quantization checkpoints (`python -m qvgen.convert`).

The synthetic checkpoint below follows the layout of ModelTC/QVGen (training/quant/quant.py:
QuantLinear.w/.b, LSQ+ wquantizer.scale/zero_point of shape (out, 1), learnable-clipped dynamic
aquantizer.lower/upper of shape (T,)); `TheirLinear` re-implements their forward independently of
QVGen's code, so the converted model is checked against the authors' arithmetic.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tiny_models import tiny_wan, wan_inputs
from torch import nn

import qvgen
from qvgen import CheckpointError
from qvgen.adapters.official import convert_official, main
from qvgen.quantizers import init_weight_qparams

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

T = 50
SKIP = ("proj_out",)


def authors_state(model: nn.Module, skip=SKIP, lora: str | None = None, phi: str | None = None) -> dict:
    g = torch.Generator().manual_seed(0)
    lin = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    sd = {}
    for k, v in model.state_dict().items():
        if k.rpartition(".")[0] not in lin or k.rpartition(".")[0] in skip:
            sd[k] = v.to(torch.bfloat16)
    logit = math.log(0.95 / 0.05)
    for n, m in lin.items():
        if n in skip:
            continue
        s, z = init_weight_qparams(m.weight, 4)
        sd[f"{n}.w"] = m.weight.detach().to(torch.bfloat16)
        if m.bias is not None:
            sd[f"{n}.b"] = m.bias.detach().to(torch.bfloat16)
        sd[f"{n}.wquantizer.scale"], sd[f"{n}.wquantizer.zero_point"] = s, z
        sd[f"{n}.aquantizer.lower"] = logit + 0.5 * torch.randn(T, generator=g)
        sd[f"{n}.aquantizer.upper"] = logit + 0.5 * torch.randn(T, generator=g)
        if n == lora:
            sd[f"{n}.loraA.weight"] = 0.01 * torch.randn(4, m.in_features, generator=g)
            sd[f"{n}.loraB.weight"] = 0.01 * torch.randn(m.out_features, 4, generator=g)
        if n == phi:
            sd[f"{n}.wquantizer.L"] = torch.randn(m.out_features, 2, generator=g)
            sd[f"{n}.wquantizer.R"] = torch.randn(2, m.in_features, generator=g)
    return sd


def write_authors(folder: Path, model: nn.Module, sd: dict, config: bool = True) -> Path:
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    if config:
        model.save_config(folder)
    return folder


class TheirLinear(nn.Module):
    """ModelTC/QVGen QuantLinear at inference: LSQ+ weight, learnable-clipped dynamic per-token activation."""

    def __init__(self, sd: dict, n: str, idx: int | None, clip_ratio: float = 0.95):
        super().__init__()
        w = sd[f"{n}.w"].float()
        if f"{n}.loraA.weight" in sd:
            w = w + sd[f"{n}.loraB.weight"] @ sd[f"{n}.loraA.weight"]
        self.w = nn.Parameter(w)
        self.b = sd.get(f"{n}.b")
        self.s, self.z = sd[f"{n}.wquantizer.scale"], sd[f"{n}.wquantizer.zero_point"]
        lo, hi = torch.sigmoid(sd[f"{n}.aquantizer.lower"]), torch.sigmoid(sd[f"{n}.aquantizer.upper"])
        self.lo, self.hi = (lo[idx], hi[idx]) if idx is not None else (lo.mean(), hi.mean())
        self.ratio = clip_ratio

    def forward(self, x):
        p = 15
        xr = x.reshape(-1, x.shape[-1]).float()
        mn = xr.amin(-1, keepdim=True) * self.ratio * self.lo
        mx = xr.amax(-1, keepdim=True) * self.ratio * self.hi
        sc = ((mx - mn) / p).clamp_min(1e-5)
        zp = (-torch.round(mn / sc)).clamp(0, p)
        xq = (sc * (torch.clamp(torch.round(xr / sc) + zp, 0, p) - zp)).reshape(x.shape)
        wq = self.s * (torch.clamp(torch.round(self.w / self.s + self.z), 0, p) - self.z)
        return F.linear(xq, wq, None if self.b is None else self.b.float())


def their_model(sd: dict, idx: int | None) -> nn.Module:
    ref = tiny_wan()
    plain = {
        k: v.float() for k, v in sd.items() if "quantizer" not in k and "lora" not in k and k[-2:] not in (".w", ".b")
    }
    ref.load_state_dict(plain, strict=False)
    for n, m in list(ref.named_modules()):
        if isinstance(m, nn.Linear) and n not in SKIP:
            parent, _, child = n.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, child, TheirLinear(sd, n, idx))
    return ref.eval()


def run(model, t: float):
    x, _, e = wan_inputs(batch=1)
    with torch.no_grad():
        return model(x, torch.tensor([t]), e, return_dict=False)[0].float()


@pytest.fixture(scope="module")
def states():
    """(model, plain authors' state, the same with a QA-LoRA branch and leftover Φ), built once."""
    model = tiny_wan()
    return model, authors_state(model), authors_state(model, lora="blocks.0.attn1.to_v", phi="blocks.1.ffn.net.2")


@pytest.fixture
def authors(tmp_path, states):
    model, _, sd = states
    return write_authors(tmp_path / "authors", model, dict(sd)), sd


def test_converted_model_matches_the_authors_forward(tmp_path, authors):
    folder, sd = authors
    result = convert_official(folder, tmp_path / "out" / "transformer", dtype=torch.float32)
    assert result.full_precision == ["proj_out"] and len(result.quantized) == 25
    assert result.merged_lora == ["blocks.0.attn1.to_v"]
    assert sorted(result.ignored) == ["blocks.1.ffn.net.2.wquantizer.L", "blocks.1.ffn.net.2.wquantizer.R"]
    cfg = qvgen.load_checkpoint(tmp_path / "out" / "transformer").config
    assert (cfg.n_buckets, cfg.current_rank, cfg.modules_to_not_convert, cfg.act_fixed_clip) == (
        1000,
        0,
        ["proj_out"],
        0.95,
    )
    prov = json.loads((tmp_path / "out" / "transformer" / "qvgen_provenance.json").read_text())
    assert prov["method"] == "converted" and prov["clip_buckets"] == "mod"
    model = WanTransformer3DModel.from_pretrained(tmp_path / "out", subfolder="transformer")
    for t in (437.0, 975.0, 12.0, 999.0):  # default: their training's pair int(t) mod 50 at timestep t
        ref = run(their_model(sd, int(t) % T), t)
        assert torch.allclose(run(model, t), ref, atol=1e-4, rtol=1e-4)


def test_identity_buckets_follow_their_inference_countdown(tmp_path, authors):
    folder, sd = authors
    convert_official(folder, tmp_path / "out", clip_buckets="identity", dtype=torch.float32)
    assert qvgen.load_checkpoint(tmp_path / "out").config.n_buckets == T
    model = qvgen.load_quantized_model(tmp_path / "out")
    for t in (437.0, 975.0):  # bucket b = floor(t · 50 / 1000) uses the authors' pair b
        ref = run(their_model(sd, int(t * T / 1000)), t)
        assert torch.allclose(run(model, t), ref, atol=1e-4, rtol=1e-4)


def test_single_file_without_diffusers_equals_convert_official(tmp_path, authors, monkeypatch):
    """What the ComfyUI loader runs: no diffusers needed, the same tensors as `python -m qvgen.convert`."""
    from qvgen.adapters.official import convert_to_file

    folder, _ = authors
    convert_official(folder, tmp_path / "ref.safetensors", dtype=torch.bfloat16)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # importing diffusers now fails
    monkeypatch.setitem(sys.modules, "accelerate", None)
    result = convert_to_file(folder, tmp_path / "x" / "got.safetensors")
    assert len(result.quantized) == 25 and result.full_precision == ["proj_out"]
    got, ref = (
        qvgen.load_checkpoint(tmp_path / "x" / "got.safetensors"),
        qvgen.load_checkpoint(tmp_path / "ref.safetensors"),
    )
    assert got.config == ref.config and got.state_dict.keys() == ref.state_dict.keys()
    for k, t in ref.state_dict.items():
        assert got.state_dict[k].dtype == t.dtype and torch.equal(got.state_dict[k], t), k


def test_mean_buckets_single_file_and_cli(tmp_path, authors, capsys):
    folder, sd = authors
    out = tmp_path / "wan-w4a4.safetensors"
    assert main([str(folder), str(out), "--clip-buckets", "mean", "--dtype", "fp32"]) == 0
    assert "quantized layers: 25 (W4A4, 1 clipping bucket(s))" in capsys.readouterr().out
    ckpt = qvgen.load_checkpoint(out)
    assert ckpt.config.n_buckets == 1 and ckpt.state_dict["blocks.0.attn1.to_q.act_clip"].shape == (1, 2)
    model = qvgen.load_quantized_model(out)
    assert torch.allclose(run(model, 300.0), run(their_model(sd, None), 300.0), atol=1e-3, rtol=1e-3)


def test_config_from_base_model_when_the_source_has_none(tmp_path, states):
    model, sd, _ = states
    folder = write_authors(tmp_path / "authors", model, dict(sd), config=False)
    with pytest.raises(CheckpointError, match="pass --base-model"):
        convert_official(folder, tmp_path / "a")
    base = tmp_path / "base" / "transformer"
    model.save_config(base)
    convert_official(folder / "diffusion_pytorch_model.safetensors", tmp_path / "b", base_model=str(base.parent))
    assert qvgen.load_checkpoint(tmp_path / "b").model_config["_class_name"] == "WanTransformer3DModel"


def _broken(tmp_path, states, fn):
    model, sd, _ = states
    sd = dict(sd)
    fn(sd)
    return write_authors(tmp_path / "authors", model, sd)


L = "blocks.0.attn1.to_q"


@pytest.mark.parametrize(
    "fn, pattern",
    [
        (lambda sd: [sd.pop(k) for k in list(sd) if "quantizer" in k], r"no '<layer>.wquantizer.scale' tensors"),
        (lambda sd: sd.pop(f"{L}.wquantizer.zero_point"), rf"tensor '{L}.wquantizer.zero_point': expected shape"),
        (
            lambda sd: sd.update({f"{L}.wquantizer.scale": torch.ones(5, 1)}),
            rf"'{L}.wquantizer.scale': expected shape \(64, 1\), got \(5, 1\)",
        ),
        (lambda sd: sd.pop(f"{L}.aquantizer.upper"), r"'aquantizer.lower' and 'aquantizer.upper' must come together"),
        (
            lambda sd: sd.update({f"{L}.aquantizer.lower": torch.zeros(7), f"{L}.aquantizer.upper": torch.zeros(7)}),
            r"disagree on the number of activation clipping pairs: \[7, 50\]",
        ),
        (lambda sd: sd.update({"nonexistent.layer.wquantizer.scale": torch.ones(3, 1)}), r"belongs to no linear layer"),
        (lambda sd: sd.pop("patch_embedding.weight"), r"missing tensors \['patch_embedding.weight'\]"),
    ],
    ids=["not-authors", "missing-zero", "scale-shape", "half-clip", "clip-count", "unknown-layer", "missing-other"],
)
def test_malformed_sources_give_clear_errors(tmp_path, states, fn, pattern):
    folder = _broken(tmp_path, states, fn)
    with pytest.raises(CheckpointError, match=pattern):
        convert_official(folder, tmp_path / "out")


def test_truncated_source_names_the_file(tmp_path, authors):
    folder, _ = authors
    f = folder / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"{f}: not a readable safetensors file"):
        convert_official(folder, tmp_path / "out")
    assert main([str(folder), str(tmp_path / "out")]) == 2


def test_python_dash_m_qvgen_convert_help():
    cmd = [sys.executable, "-m", "qvgen.convert", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    assert "authors' fake-quantization checkpoints" in out.stdout
