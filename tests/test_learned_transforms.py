"""Timestep-dependent smoothing (`smooth_buckets`) and learned rotations (`learned_rotation`).

Checks, each against an independent computation:
- at initialisation both variants are the plain transform bit for bit (equal scale rows; the Cayley
  map of 0 is the identity, and multiplying by an identity block adds only exact zeros);
- with random (trained-looking) parameters the unquantized layer is still `x Wᵀ + b`: compared with
  a float64 `nn.Linear`, tolerance `_fp32_bound` below;
- the folded form a kernel would run (per sample: `Q(x Q C / s_g) · Q(W Q C · s_g)ᵀ`, one int weight
  per smoothing group) equals the batched fake-quant forward on a batch that mixes groups; both
  quantize the same fp32 values with the same operations, so only the matmul's summation order
  differs;
- the Cayley blocks are orthogonal to fp32 accuracy after optimizer steps; gradients reach the
  rotation and exactly the scale rows of the groups in the batch;
- config validation, scheme refusal, export refusal, the trainer's param groups, CLI and demo flags.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import wan_inputs

from qvgen import QVGenConfig, convert_model
from qvgen.config import ConfigError
from qvgen.layers import QVGenLinear
from qvgen.quantizers import init_weight_qparams
from qvgen.timestep import TimestepState
from qvgen.transforms import block_rotate, cayley, smooth_group, smoothing_scales

U32 = 2.0**-24  # fp32 unit roundoff
K, N, N_BUCKETS = 128, 48, 10


def _config(**kw) -> QVGenConfig:
    base = dict(rank=0, n_buckets=N_BUCKETS, input_transform="smooth_hadamard", train_transform=True)
    return QVGenConfig(**{**base, **kw})


def _layer(cfg: QVGenConfig, seed: int = 0) -> tuple[torch.nn.Linear, QVGenLinear, TimestepState]:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N)
    layer = QVGenLinear.from_linear(lin, cfg, name="blocks.0.attn.to_q")
    state = TimestepState(cfg.n_buckets, cfg.num_train_timesteps)
    layer.timestep_state = state
    return lin, layer, state


def _randomise(layer: QVGenLinear, seed: int = 1) -> None:
    """Parameters as training might leave them: scale rows that differ, a rotation far from identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if layer.smooth_log is not None:
            layer.smooth_log.copy_(torch.randn(layer.smooth_log.shape, generator=g) * 0.7)
        if layer.rot_skew is not None:
            layer.rot_skew.copy_(torch.randn(layer.rot_skew.shape, generator=g) * 0.2)
        layer.init_quantization()


def _x(batch: int = 3, tokens: int = 6, seed: int = 2) -> torch.Tensor:
    x = torch.randn(batch, tokens, K, generator=torch.Generator().manual_seed(seed))
    x[..., 5] *= 20.0  # an outlier channel: what smoothing and rotation are for
    return x


TIMESTEPS = torch.tensor([50.0, 950.0, 420.0])  # buckets 0, 9, 4: three different groups of 5


def _fp32_bound(x: torch.Tensor, lin: torch.nn.Linear) -> float:
    """|fp32 layer − exact| ≤ ~(c·K)·u·Σ|x||W| with c covering the transform (rotation, Cayley solve,
    division), the folded weight and the K-term dot product; c = 64 is generous for these sizes."""
    return 64 * K * U32 * float((x.abs() @ lin.weight.detach().abs().T).max())


# ---- initialisation: the plain transform exactly ---------------------------------------------------


@pytest.mark.parametrize("extra", [{"smooth_buckets": 5}, {"learned_rotation": 32}])
def test_init_is_the_plain_transform_bit_for_bit(extra: dict) -> None:
    _, plain, state_p = _layer(_config())
    _, learned, state_l = _layer(_config(**extra))
    with torch.no_grad():
        learned.smooth_log.copy_(torch.linspace(-1, 1, K))  # calibrated scales, same in every group
        plain.smooth_log.copy_(torch.linspace(-1, 1, K))
    plain.init_quantization()
    learned.init_quantization()
    # one group for the batch: a mixed batch runs one matmul per group, whose summation order may differ
    t = TIMESTEPS if "learned_rotation" in extra else torch.full((3,), 420.0)
    for s in (state_p, state_l):
        s.set_timestep(t)
    x = _x()
    assert torch.equal(learned(x), plain(x))


# ---- function preservation and the folded form -----------------------------------------------------


def test_unquantized_layer_is_the_linear_layer() -> None:
    lin, layer, state = _layer(_config(smooth_buckets=5, learned_rotation=32))
    _randomise(layer)
    layer.quantize_weights = layer.quantize_acts = False
    state.set_timestep(TIMESTEPS)
    x = _x()
    exact = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    err = (layer(x).double() - exact).abs().max().item()
    assert err <= _fp32_bound(x, lin)


@pytest.mark.parametrize("extra", [{"smooth_buckets": 5}, {"smooth_buckets": 2, "learned_rotation": 64}])
def test_mixed_batch_equals_the_folded_per_group_form(extra: dict) -> None:
    """Each sample through its own group's int weight (what a kernel with one packed weight per group runs)."""
    _, layer, state = _layer(_config(**extra))
    _randomise(layer)
    x = _x()
    state.set_timestep(TIMESTEPS)
    with torch.no_grad():
        batched = layer(x)
        groups = smooth_group(state.bucket, N_BUCKETS, layer.smooth_buckets)
        assert len(set(groups.tolist())) > 1  # the batch mixes groups
        for i, t in enumerate(TIMESTEPS):
            state.set_timestep(float(t))
            g = int(groups[i])
            wq = layer.weight_quantizer_of(g)  # each group's packed weight has its own scales
            codes = wq.int_codes(layer.effective_weight(g))  # the packed weight of group g
            w = (codes.float() - wq.zero) * wq.scale  # dequantized
            x_hat = layer.act_quantizer(layer.transform_input(x[i : i + 1]), state.bucket)
            folded = torch.nn.functional.linear(x_hat, w, layer.bias)
            # same codes on both sides: only the K-term sum's order may differ
            tol = 4 * K * U32 * float((x_hat.abs() @ w.abs().T).max())
            assert (batched[i : i + 1] - folded).abs().max().item() <= tol


def test_each_group_has_its_own_weight_scales() -> None:
    _, layer, _ = _layer(_config(smooth_buckets=3))
    _randomise(layer)
    for g in range(3):
        ref = init_weight_qparams(layer.effective_weight(g).detach(), 4)
        assert all(torch.equal(a, b) for a, b in zip(layer.weight_quantizer_of(g).parameters(), ref, strict=True))
    assert not torch.equal(layer.weight_quantizer_of(1).scale, layer.weight_quantizer_of(2).scale)


def test_calibration_is_per_group() -> None:
    """Each group's row is SmoothQuant on its own inputs; a group without calibration data gets all of them."""
    model = torch.nn.Sequential(torch.nn.Linear(K, N))
    cfg = _config(smooth_buckets=5, input_transform="smooth")
    gen = torch.Generator().manual_seed(3)
    xs = {50.0: torch.randn(2, 4, K, generator=gen), 950.0: torch.randn(2, 4, K, generator=gen) * 5}

    def run(m: torch.nn.Module) -> None:
        for t, x in xs.items():
            m(x, timestep=torch.full((2,), t))

    model.forward = lambda x, timestep: torch.nn.Sequential.forward(model, x)  # convert_model's hook reads it
    convert_model(model, cfg, progress=False, calibrate=run)
    layer = model[0]
    amax = {t: x.abs().reshape(-1, K).amax(0) for t, x in xs.items()}
    expect = {0: amax[50.0], 4: amax[950.0], 1: torch.maximum(amax[50.0], amax[950.0])}
    for group, a in expect.items():
        ref = smoothing_scales(a, layer.weight, cfg.smooth_alpha).log()
        assert torch.equal(layer.smooth_log[group], ref)


# ---- orthogonality and gradients --------------------------------------------------------------------


def test_cayley_blocks_stay_orthogonal_while_training() -> None:
    _, layer, state = _layer(_config(learned_rotation=32))
    assert torch.equal(layer.learned_blocks(), torch.eye(32).expand(K // 32, 32, 32))
    opt = torch.optim.Adam([layer.rot_skew], lr=0.05)
    x = _x()
    state.set_timestep(TIMESTEPS)
    for _ in range(5):
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        opt.step()
    c = layer.learned_blocks()
    eye = torch.eye(32).expand_as(c)
    assert (c - eye).abs().max() > 0.05  # it moved
    # Cayley is exactly orthogonal; fp32 solve error ~ b·u·cond(I − A), cond ≤ 1 + 2‖P‖ here
    cond = 1 + 2 * float(torch.linalg.matrix_norm(layer.rot_skew.detach(), ord=2).max())
    assert (c @ c.transpose(-1, -2) - eye).abs().max() <= 32 * 32 * U32 * cond
    assert torch.allclose(block_rotate(x, c).norm(dim=-1), x.norm(dim=-1), rtol=1e-5)  # norms kept


def test_cayley_is_orthogonal_for_large_parameters() -> None:
    p = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    c = cayley(p)
    assert torch.allclose(c @ c.transpose(-1, -2), torch.eye(16, dtype=torch.float64).expand_as(c), atol=1e-10)


def test_gradients_reach_rotation_and_only_the_groups_in_the_batch() -> None:
    _, layer, state = _layer(_config(smooth_buckets=5, learned_rotation=32))
    _randomise(layer)
    state.set_timestep(TIMESTEPS)  # groups 0, 4, 2
    layer(_x()).pow(2).mean().backward()
    assert torch.isfinite(layer.rot_skew.grad).all() and layer.rot_skew.grad.abs().sum() > 0
    row_grad = layer.smooth_log.grad.abs().sum(dim=1)
    assert (row_grad[[0, 2, 4]] > 0).all()
    assert (row_grad[[1, 3]] == 0).all()


def test_whole_model_converts_and_trains(wan_model) -> None:
    cfg = QVGenConfig(
        n_buckets=N_BUCKETS,
        input_transform="smooth_hadamard",
        train_transform=True,
        smooth_buckets=2,
        learned_rotation=32,
    )
    x, t, e = wan_inputs()
    convert_model(wan_model, cfg, progress=False, calibrate=lambda m: m(x, t, e))
    out = wan_model(x, t, e, return_dict=False)[0]
    out.pow(2).mean().backward()
    layers = [m for m in wan_model.modules() if isinstance(m, QVGenLinear)]
    assert layers and all(m.rot_skew is not None and m.rot_skew.grad is not None for m in layers)
    # t = 100 and 900: buckets 1 and 9, groups 0 and 1; both rows learn
    assert all((m.smooth_log.grad.abs().sum(dim=1) > 0).all() for m in layers)


# ---- config, refusals, doors ------------------------------------------------------------------------


def test_config_fields_and_validation() -> None:
    cfg = _config(smooth_buckets=5, learned_rotation=64)
    back = QVGenConfig.from_json(cfg.to_json())
    assert (back.smooth_buckets, back.learned_rotation) == (5, 64)
    assert (QVGenConfig.from_dict({}).smooth_buckets, QVGenConfig.from_dict({}).learned_rotation) == (1, 0)
    # at their defaults they stay out of every written config: checkpoints keep format v4's keys
    assert not {"smooth_buckets", "learned_rotation"} & set(QVGenConfig().to_dict())
    bad = [
        (dict(smooth_buckets=11), "smooth_buckets: expected an integer in \\[1, 10\\]"),
        (dict(smooth_buckets=2, input_transform="hadamard"), "smooth_buckets: .*smooth or smooth_hadamard"),
        (dict(learned_rotation=48), "learned_rotation: expected 0 \\(off\\) or a power of two"),
        (dict(learned_rotation=1), "learned_rotation: expected 0 \\(off\\) or a power of two"),
        (dict(learned_rotation=32, input_transform="smooth"), "learned_rotation: .*hadamard or smooth_hadamard"),
    ]
    for kw, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            _config(**kw)


@pytest.mark.parametrize("scheme", ["convrot_w4a4", "nvfp4", "w4a8_int8", "svdquant_w4a4"])
def test_other_schemes_refuse_by_name(scheme: str) -> None:
    for kw in (dict(smooth_buckets=2), dict(learned_rotation=32)):
        with pytest.raises(ConfigError, match=f"{next(iter(kw))}: scheme '{scheme}'"):
            QVGenConfig(scheme=scheme, train_transform=True, **kw)


@pytest.mark.parametrize("extra", [{"smooth_buckets": 2}, {"learned_rotation": 32}])
def test_export_refuses_naming_the_fields(extra: dict) -> None:
    _, layer, _ = _layer(_config(**extra))
    with pytest.raises(NotImplementedError, match="smooth_buckets / learned_rotation"):
        layer.export_tensors()


def test_trainer_keeps_the_learned_transforms_out_of_weight_decay() -> None:
    from qvgen.train import TrainOptions
    from qvgen.train.trainer import param_groups

    _, layer, _ = _layer(_config(smooth_buckets=2, learned_rotation=32))
    groups = {g["name"]: g for g in param_groups(layer, TrainOptions(output_dir="unused"))}
    no_decay = {id(p) for p in groups["quantizer_bias_norm"]["params"]}
    assert id(layer.smooth_log) in no_decay and id(layer.rot_skew) in no_decay


def test_train_and_demo_flags_reach_the_config() -> None:
    from qvgen.demo.run import _configs
    from qvgen.demo.run import build_parser as demo_parser
    from qvgen.train.cli import build_parser, quant_config

    args = ["--model", "m", "--input-transform", "smooth_hadamard", "--smooth-buckets", "5", "--learned-rotation", "64"]
    cfg = quant_config(build_parser().parse_args(args))
    assert (cfg.smooth_buckets, cfg.learned_rotation) == (5, 64)
    demo = ["--transforms", "smooth,smooth_hadamard", "--smooth-buckets", "2,5", "--learned-rotation", "32"]
    configs = _configs(demo_parser().parse_args(demo))
    tagged = {
        name: (c.smooth_buckets, c.learned_rotation) for name, c in configs.items() if "+tb" in name or "+rot" in name
    }
    assert tagged == {
        "PTQ+smooth+tb2": (2, 0),
        "PTQ+smooth+tb5": (5, 0),
        "PTQ+smooth_hadamard+tb2": (2, 0),
        "PTQ+smooth_hadamard+tb5": (5, 0),
        "QAT+smooth+tb2": (2, 0),
        "QVGen+smooth+tb2": (2, 0),
        "QAT+smooth+tb5": (5, 0),
        "QVGen+smooth+tb5": (5, 0),
        "QAT+smooth_hadamard+tb2": (2, 0),
        "QVGen+smooth_hadamard+tb2": (2, 0),
        "QAT+smooth_hadamard+tb5": (5, 0),
        "QVGen+smooth_hadamard+tb5": (5, 0),
        "QAT+smooth_hadamard+rot32": (1, 32),
        "QVGen+smooth_hadamard+rot32": (1, 32),
    }
    assert configs["QVGen+smooth"].smooth_buckets == 1  # the plain rows stay
    only = _configs(demo_parser().parse_args([*demo, "--only", "*+tb5,PTQ+smooth"]))
    assert list(only) == [
        "PTQ",
        "QAT",
        "QVGen",
        "PTQ+smooth",
        "PTQ+smooth+tb5",
        "QAT+smooth+tb5",
        "QVGen+smooth+tb5",
    ] + [
        "PTQ+smooth_hadamard+tb5",
        "QAT+smooth_hadamard+tb5",
        "QVGen+smooth_hadamard+tb5",
    ]
