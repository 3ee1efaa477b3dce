"""Per-layer activation bits (`QVGenConfig.layer_act_bits`, issue #16 item 3): 8-bit inputs where the error is.

Checks, each against an independent computation:
- the config field validates, round-trips through JSON and is refused by schemes with one fixed width;
- the 8-bit layer of a packed model quantizes its input with 8 bits: the CPU path's codes, scales,
  zero points and sums equal the reference's bit for bit, and the reference's x̂ is the training
  layer's fake-quant input bit for bit (same fp32 operations);
- a packed model with a mixed layer (export → load, integer path) follows the fake-quant student within
  `tiny_models.assert_matches_fake_quant`'s tolerance, which the same file run at 4 bits misses by far;
- the checkpoint carries each mixed layer's width (`input_bits`) through both layouts, diffusers and the
  ComfyUI op, and refuses a file whose tensor disagrees with its config;
- the sensitivity picker (`qvgen.eval.sensitivity`) picks the layer a planted outlier channel makes worst,
  and `--act8-layers` reaches the config in `python -m qvgen.train` and the demo.
"""

from __future__ import annotations

import pytest
import qvgen_kernels as qk
import torch
from qvgen_kernels import cpu, reference
from tiny_models import assert_matches_fake_quant, tiny_wan, wan_inputs

from qvgen import PackedLinear, QVGenConfig, convert_model, load_quantized_model, save_quantized
from qvgen.checkpoint import CheckpointError, load_checkpoint
from qvgen.config import ConfigError
from qvgen.packed_layer import PackedLayerError, quantize_linear

MIXED = {"proj_out": 8, "blocks.0.ffn.net.2": 8}  # K = 64 and K = 128 in tiny_wan


# ---- config ------------------------------------------------------------------------------------
def test_config_field_validates_and_round_trips() -> None:
    cfg = QVGenConfig(layer_act_bits={"proj_out": 8, "blocks.*.ffn.*": 6})
    back = QVGenConfig.from_json(cfg.to_json())
    assert back.layer_act_bits == {"proj_out": 8, "blocks.*.ffn.*": 6}
    assert QVGenConfig.from_dict({}).layer_act_bits == {}  # files without the field: one width
    assert [cfg.act_bits_of(n) for n in ("proj_out", "blocks.1.ffn.net.2", "blocks.1.attn1.to_q")] == [8, 6, 4]
    assert cfg.for_layer("blocks.1.attn1.to_q") is cfg
    assert cfg.for_layer("proj_out").act_bits == 8 and cfg.for_layer("proj_out").layer_act_bits == {}
    with pytest.raises(ConfigError, match=r"layer_act_bits\['proj_out'\]: expected an integer in \[2, 8\], got 16"):
        QVGenConfig(layer_act_bits={"proj_out": 16})
    with pytest.raises(ConfigError, match="layer_act_bits: expected an object"):
        QVGenConfig(layer_act_bits=["proj_out"])
    with pytest.raises(ConfigError, match="layer_act_bits: needs quantized activations"):
        QVGenConfig(act_bits=None, layer_act_bits={"proj_out": 8})
    with pytest.raises(ConfigError, match="layer 'blocks.0.ffn.net.2' matches patterns with different bits"):
        QVGenConfig(layer_act_bits={"blocks.*": 8, "*.ffn.*": 6}).act_bits_of("blocks.0.ffn.net.2")


@pytest.mark.parametrize("scheme", ["convrot_w4a4", "nvfp4", "w4a8_int8", "svdquant_w4a4"])
def test_other_schemes_refuse_it_by_name(scheme: str) -> None:
    with pytest.raises(ConfigError, match=f"layer_act_bits: scheme '{scheme}' has one activation width"):
        QVGenConfig(scheme=scheme, layer_act_bits={"proj_out": 8})


def test_unmatched_pattern_warns() -> None:
    with pytest.warns(UserWarning, match=r"layer_act_bits: pattern\(s\) \['proj_ot'\] match no quantized layer"):
        convert_model(tiny_wan(), QVGenConfig(rank=0, layer_act_bits={"proj_ot": 8}), init=False, progress=False)


# ---- a mixed model -----------------------------------------------------------------------------
def _mixed(transform: str = "none", layers: dict[str, int] = MIXED):
    model = tiny_wan()
    cfg = QVGenConfig(rank=4, n_buckets=4, layer_act_bits=dict(layers), input_transform=transform)
    convert_model(model, cfg, progress=False, calibrate=lambda m: m(*wan_inputs(seed=2), return_dict=False))
    g = torch.Generator().manual_seed(3)
    for m in model.modules():  # non-trivial clip factors, as after training
        if getattr(m, "act_quantizer", None) is not None:
            m.act_quantizer.clip_logits.data = torch.rand(m.act_quantizer.clip_logits.shape, generator=g) * 4
    return model.eval(), cfg


def _out(model) -> torch.Tensor:
    x, t, e = wan_inputs()
    with torch.no_grad():
        return model(x, t, e, return_dict=False)[0]


def test_training_layers_get_their_width() -> None:
    model, _ = _mixed()
    assert model.proj_out.act_quantizer.bits == 8 and model.proj_out.own_act_bits == 8
    assert model.blocks[0].ffn.net[2].act_quantizer.bits == 8
    assert model.blocks[1].ffn.net[2].act_quantizer.bits == 4 and model.blocks[1].ffn.net[2].own_act_bits is None


@pytest.mark.parametrize("single_file", [False, True])
def test_packed_model_follows_fake_quant(tmp_path, single_file: bool) -> None:
    model, cfg = _mixed("smooth")
    ref = _out(model)
    path = tmp_path / ("ckpt.safetensors" if single_file else "ckpt")
    save_quantized(model, cfg, path, dtype=torch.float32)
    loaded = load_quantized_model(path)
    assert loaded.proj_out.act_bits == 8 and loaded.blocks[0].ffn.net[2].act_bits == 8
    assert loaded.blocks[1].ffn.net[2].act_bits == 4 and loaded.blocks[1].ffn.net[2].input_bits is None
    assert_matches_fake_quant(_out(loaded), ref)
    # the same file run with 4-bit inputs everywhere is far outside that tolerance: the width matters
    for name in MIXED:
        loaded.get_submodule(name).act_bits = 4
    gap = float((_out(loaded) - ref).norm() / ref.norm())
    assert gap > 10 * 2e-3, gap  # 10× the tolerance above (measured: 6.8e-2)


def test_the_8bit_layer_codes_are_the_reference(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The packed 8-bit layer's call: CPU codes/scales/zeros/sums = reference's, reference x̂ = training x̂."""
    model, cfg = _mixed("smooth")
    save_quantized(model, cfg, tmp_path / "ckpt", dtype=torch.float32)
    loaded = load_quantized_model(tmp_path / "ckpt")
    calls: list[dict] = []
    real = qk.quantized_linear

    def spy(x, qweight, *args, **kw):
        calls.append({"x": x, **kw})
        return real(x, qweight, *args, **kw)

    monkeypatch.setattr(qk, "quantized_linear", spy)
    _out(loaded)
    _out(model)  # the student sees the same timestep (its buckets) for the comparison below
    widths = {c["in_features"]: set() for c in calls}
    for c in calls:
        widths[c["in_features"]].add(c["a_bits"])
    head = [c for c in calls if c["a_bits"] == 8 and c["in_features"] == 64 and c["x"].shape[-1] == 64]
    assert head and widths[128] == {4, 8}  # the two FFN-down layers: one of each width
    c = head[-1]  # proj_out: the last 8-bit call of the forward
    tf = dict(input_signs=c["input_signs"], rot_block=c["rot_block"], smooth=c["smooth"])
    assert tf["smooth"] is not None
    got = cpu.quantize_activation(c["x"], c["clip_lo"], c["clip_hi"], 8, **tf)
    want = reference.quantize_activation(c["x"], c["clip_lo"], c["clip_hi"], 8, **tf)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert int(want[0].max()) > 15  # 8-bit codes, not 4-bit ones
    q, s, z, _ = want
    x_hat = (s * (q.float() - z)).reshape(c["x"].shape)
    assert torch.equal(x_hat, model.proj_out.quantize_input(c["x"]))


# ---- the file ----------------------------------------------------------------------------------
def test_checkpoint_carries_the_width(tmp_path) -> None:
    model, cfg = _mixed()
    save_quantized(model, cfg, tmp_path / "ckpt", dtype=torch.float32)
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.config.layer_act_bits == MIXED and ckpt.config.format_version == 5
    bits = {k.rpartition(".")[0]: int(v[0]) for k, v in ckpt.state_dict.items() if k.endswith(".input_bits")}
    assert bits == MIXED
    # diffusers builds the shells from the config and fills them from the file
    from diffusers import WanTransformer3DModel

    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.proj_out.act_bits == 8 and int(loaded.proj_out.input_bits[0]) == 8
    assert loaded.blocks[1].ffn.net[2].act_bits == 4


def test_file_disagreeing_with_its_config_is_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    model, cfg = _mixed()
    path = save_quantized(model, cfg, tmp_path / "m.safetensors", dtype=torch.float32)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    for edit, match in (
        (lambda s: s.pop("proj_out.input_bits"), r"'proj_out.input_bits': expected a tensor \(layer_act_bits"),
        (lambda s: s["proj_out.input_bits"].fill_(6), r"'proj_out.input_bits': expected 8 \(layer_act_bits\), got 6"),
        (
            lambda s: s.__setitem__("blocks.1.ffn.net.2.input_bits", torch.full((1,), 8, dtype=torch.uint8)),
            r"'blocks.1.ffn.net.2.input_bits': expected no tensor \(the layer has the model's act_bits=4\)",
        ),
    ):
        bad = {k: v.clone() for k, v in state.items()}
        edit(bad)
        save_file(bad, str(tmp_path / "bad.safetensors"), metadata=meta)
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(tmp_path / "bad.safetensors")


def test_packed_layer_reads_its_width_from_the_tensor() -> None:
    """What the ComfyUI op relies on: its layers are built with the model's width, the tensor sets the layer's."""
    cfg = QVGenConfig(rank=0, layer_act_bits={"head": 8})
    w, b = torch.randn(6, 32), torch.randn(6)
    tensors = quantize_linear(w, b, cfg, name="head")
    assert int(tensors["input_bits"][0]) == 8 and "input_bits" not in quantize_linear(w, b, cfg, name="other")
    layer = PackedLinear(32, 6, True, act_bits=4, allocate=False)
    layer.set_tensors(tensors, name="head")
    assert layer.act_bits == 8
    for bad, match in ((torch.full((1,), 9, dtype=torch.uint8), "activation bits in 2..8, got 9"),
                       (torch.full((2,), 8, dtype=torch.uint8), r"expected uint8 of shape \(1,\)")):  # fmt: skip
        with pytest.raises(PackedLayerError, match=match):
            PackedLinear(32, 6, True, allocate=False).set_tensors({**tensors, "input_bits": bad}, name="head")


def test_comfyui_op_runs_the_layer_at_its_width() -> None:
    from comfy_fakes import FakeOps, import_nodes
    from torch import nn

    import_nodes()
    from qvgen.layers import QVGenLinear
    from qvgen_nodes import ops

    cfg = QVGenConfig(n_buckets=3, rank=0, layer_act_bits={"layer": 8})
    torch.manual_seed(0)
    ref = QVGenLinear.from_linear(nn.Linear(48, 40), cfg, name="layer")
    state = {"layer." + k: v for k, v in ref.export_tensors().items()}
    state["layer.weight"] = torch.empty(40, 48, device="meta")
    holder = nn.Module()
    holder.layer = ops.make_ops(FakeOps, ops.OpsSettings(config=cfg)).Linear(48, 40, dtype=torch.float32)
    holder.load_state_dict(state, strict=False)
    assert holder.layer.quantized and holder.layer.act_bits == 8
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(1))
    ref.timestep_state = holder.layer.timestep_state = None  # bucket 0 on both sides
    with torch.no_grad():
        torch.testing.assert_close(holder.layer(x), ref(x), rtol=1e-5, atol=1e-5)


# ---- picked by measured sensitivity ------------------------------------------------------------
def _plant_outlier(model, block: int = 1, channel: int = 5, factor: float = 1000.0) -> str:
    """Make `blocks.<block>.attn1.to_out.0`'s input carry one channel 1000× larger, function unchanged:
    attention is linear in V channel by channel, so scaling V's channel and dividing the output
    projection's column cancel; per-token 4-bit quantization of that input then loses the other channels."""
    attn = model.blocks[block].attn1
    with torch.no_grad():
        attn.to_v.weight[channel] *= factor
        attn.to_v.bias[channel] *= factor
        attn.to_out[0].weight[:, channel] /= factor
    return f"blocks.{block}.attn1.to_out.0"


def _inputs(n: int = 2) -> list[dict]:
    out = []
    for seed in range(n):
        x, t, e = wan_inputs(seed=seed)
        out.append({"hidden_states": x, "timestep": t, "encoder_hidden_states": e})
    return out


def test_picker_finds_the_planted_layer() -> None:
    from qvgen.eval.sensitivity import layer_sensitivity, most_sensitive

    cfg = QVGenConfig(rank=0, n_buckets=1, modules_to_convert=["blocks.1.*", "proj_out"])  # 11 candidates
    plain = tiny_wan().eval()
    before = layer_sensitivity(plain, cfg, _inputs(1))
    planted = tiny_wan().eval()
    name = _plant_outlier(planted)
    torch.testing.assert_close(_out(planted), _out(plain), rtol=1e-4, atol=1e-5)  # same function
    after = layer_sensitivity(planted, cfg, _inputs(1))
    assert set(after) == set(before) and len(after) == 11 and name in after
    # unplanted, proj_out is the worst by far (its error alone ~800× this layer's; measured)
    assert list(most_sensitive(before, 1)) == ["proj_out"]
    assert list(most_sensitive(after, 1)) == [name]  # planted: about 2× proj_out's (measured)
    assert after[name] > 100 * before[name]
    top = most_sensitive(after, 3)
    assert list(top.values()) == sorted(top.values(), reverse=True) and len(top) == 3


def test_mac_fraction_counts_tokens_times_k_times_n() -> None:
    from torch import nn

    from qvgen.eval.sensitivity import act8_mac_fraction

    class Two(nn.Module):  # diffusers' call convention, two layers of known shape
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 16)

        def forward(self, hidden_states, return_dict=False):
            return (self.b(self.a(hidden_states)),)

    model = Two()
    convert_model(model, QVGenConfig(rank=0, layer_act_bits={"b": 8}), progress=False)
    x = {"hidden_states": torch.randn(3, 7, 32)}
    assert act8_mac_fraction(model, x) == pytest.approx(64 * 16 / (32 * 64 + 64 * 16))


def test_cli_flags_reach_the_config() -> None:
    import argparse

    from qvgen.demo.run import _configs, _with_act8
    from qvgen.demo.run import build_parser as demo_parser
    from qvgen.eval.sensitivity import Act8Layers, parse_act8_layers
    from qvgen.train.cli import build_parser, quant_config

    assert parse_act8_layers("auto:2") == Act8Layers(auto=2)
    assert parse_act8_layers("proj_out,blocks.0.*") == Act8Layers(patterns=("proj_out", "blocks.0.*"))
    for bad in ("auto:0", "auto:x", ","):
        with pytest.raises(argparse.ArgumentTypeError, match="auto:N"):
            parse_act8_layers(bad)
    args = build_parser().parse_args(["--model", "m", "--act8-layers", "proj_out"])
    assert quant_config(args).layer_act_bits == {"proj_out": 8}
    assert quant_config(build_parser().parse_args(["--model", "m"])).layer_act_bits == {}
    with pytest.raises(ConfigError, match="layer_act_bits: scheme 'nvfp4'"):
        quant_config(build_parser().parse_args(["--model", "m", "--scheme", "nvfp4", "--act8-layers", "proj_out"]))
    demo_args = demo_parser().parse_args(["--act8-layers", "proj_out", "--schemes", "w4a8_int8"])
    configs, picks = _with_act8(None, _configs(demo_args), None, demo_args)
    assert picks == {}
    assert {n: c.layer_act_bits for n, c in configs.items()} == {
        n: ({"proj_out": 8} if c.scheme == "qvgen" else {}) for n, c in configs.items()
    }


@pytest.mark.slow  # a tiny pipeline through prepare, train and export: about a minute on a loaded 2-core VM
def test_train_cli_auto_picks_measures_once_and_exports_the_width(tmp_path, capsys) -> None:
    import json

    from tiny_models import tiny_wan_pipeline, write_clips

    from qvgen.train.cli import main

    pipe = tmp_path / "pipe"
    tiny_wan_pipeline().save_pretrained(pipe)
    write_clips(tmp_path / "data", layout="jsonl")
    out = tmp_path / "run"
    args = ["--model", str(pipe), "--output", str(out), "--act8-layers", "auto:1", "--no-progress"]
    args += ["--num-frames", "5", "--height", "32", "--width", "32", "--max-text-len", "8", "--steps", "2"]
    args += ["--rank", "0", "--buckets", "2", "--checkpoint-every", "2"]
    assert main([*args, "--data", str(tmp_path / "data")]) == 0
    record = json.loads((out / "act8_layers.json").read_text())
    (picked,) = record["picked"]
    assert record["picked"][picked] == max(record["sensitivity"].values())
    assert f"8-bit inputs on the 1 most sensitive layer(s) (MSE with only that one quantized): {picked}" in (
        capsys.readouterr().out
    )
    model = load_quantized_model(out / "transformer")
    widths = {n: m.act_bits for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert widths.pop(picked) == 8 and set(widths.values()) == {4}
    # the same command asking for another N refuses the run folder's pick instead of mixing them
    assert main([*args[:5], "auto:2", *args[6:]]) == 2
    assert "picked --act8-layers auto:1, this command asks auto:2" in capsys.readouterr().out


def test_bench_times_the_8bit_layer_beside_the_4bit_one(tmp_path) -> None:
    """`python -m qvgen.bench kernels --vs-a-bits 8`: both widths timed in one process, the ratio recorded."""
    import argparse
    import json

    from qvgen.bench import kernels_cli

    p = argparse.ArgumentParser()
    kernels_cli.add_arguments(p)
    out = tmp_path / "b.json"
    argv = ["--shapes", "64x16", "--tokens", "8", "--min-time", "0.001", "--device", "cpu", "--no-bf16", "--no-comfy"]
    assert kernels_cli.run(p.parse_args([*argv, "--vs-a-bits", "8", "--json", str(out)])) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["vs_a_bits_ratio"] > 0 and row["extra_ms"]["A8"] > 0


def test_diffusers_quantize_on_load_gives_the_layer_its_width(tmp_path) -> None:
    from diffusers import WanTransformer3DModel

    tiny_wan().save_pretrained(tmp_path / "fp")
    cfg = QVGenConfig(rank=0, layer_act_bits={"proj_out": 8})
    model = WanTransformer3DModel.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    assert model.proj_out.act_bits == 8 and model.blocks[0].attn1.to_q.act_bits == 4
    model.save_pretrained(tmp_path / "q")  # and back: the shells are built from the saved config
    again = WanTransformer3DModel.from_pretrained(tmp_path / "q")
    assert again.proj_out.act_bits == 8 and torch.equal(again.proj_out.input_bits, model.proj_out.input_bits)


def test_model_card_states_the_per_layer_widths() -> None:
    from qvgen.model_card import CardInfo, render_model_card

    def card(layer_act_bits: dict[str, int]) -> str:
        config = QVGenConfig(layer_act_bits=layer_act_bits)
        return str(render_model_card(CardInfo("me/m", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", config)))

    assert "; 8-bit on `proj_out`, `blocks.0.ffn.*`" in card({"proj_out": 8, "blocks.0.ffn.*": 8})
    assert "-bit on" not in card({})
