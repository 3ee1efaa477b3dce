"""Input transforms (rotation, smoothing): exact math, function preserved in full precision, round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import hadamard
from tiny_models import assert_matches_fake_quant, tiny_wan, wan_inputs

from qvgen import QVGenConfig, convert_model, load_quantized_model, save_quantized
from qvgen.surgery import quantization_mode
from qvgen.transforms import fwht, hadamard_block, random_signs, rotate, unrotate


@pytest.mark.parametrize("block", [1, 2, 8, 64])
def test_fwht_equals_dense_hadamard(block):
    x = torch.randn(5, 3 * block, dtype=torch.float64)
    h = torch.from_numpy(hadamard(block)).double() / np.sqrt(block)
    want = (x.view(5, 3, block) @ h).view(5, -1)
    torch.testing.assert_close(fwht(x, block), want)


def test_rotation_is_orthogonal_and_inverts():
    x = torch.randn(7, 96, dtype=torch.float64)
    signs = random_signs(96, "layer", 0).double()
    b = hadamard_block(96, 256)
    assert b == 32
    y = rotate(x, signs, b)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1))
    torch.testing.assert_close(unrotate(y, signs, b), x)
    w = torch.randn(4, 96, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, signs, b) @ rotate(w, signs, b).T, x @ w.T)  # (xQ)(WQ)ᵀ = xWᵀ


def _calibrate(x, t, e):
    def run(model):
        model(x, t, e)

    return run


@pytest.mark.parametrize("kind", ["hadamard", "smooth", "smooth_hadamard"])
def test_transform_leaves_full_precision_function_unchanged(kind):
    model = tiny_wan()
    x, t, e = wan_inputs()
    with torch.no_grad():
        ref = model(x, t, e, return_dict=False)[0]
        cfg = QVGenConfig(rank=0, input_transform=kind)
        convert_model(model, cfg, progress=False, calibrate=_calibrate(x, t, e))
        with quantization_mode(model, weights=False, acts=False):
            out = model(x, t, e, return_dict=False)[0]
    # fp32 reassociation of the rotation only: tolerance 1e-5 absolute on outputs of size ~1
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    layer = model.blocks[0].attn1.to_q
    if "smooth" in kind:
        assert not torch.allclose(layer.smooth_scale(), torch.ones(64))


@pytest.mark.parametrize("kind", ["hadamard", "smooth_hadamard"])
def test_transform_export_round_trip_and_dequantized_weight(tmp_path, kind):
    model = tiny_wan()
    x, t, e = wan_inputs()
    original_w = model.blocks[0].ffn.net[0].proj.weight.detach().clone()
    cfg = QVGenConfig(rank=4, n_buckets=2, input_transform=kind, train_transform=True)
    convert_model(model, cfg, progress=False, calibrate=_calibrate(x, t, e))
    with torch.no_grad():
        ref = model(x, t, e, return_dict=False)[0]
    save_quantized(model, cfg, tmp_path / "m.safetensors", dtype=torch.float32)
    loaded = load_quantized_model(tmp_path / "m.safetensors")
    with torch.no_grad():
        out = loaded(x, t, e, return_dict=False)[0]
    assert_matches_fake_quant(out, ref)
    # the dequantized weight is back in the original input space: close to the FP weight (4-bit + Φ)
    deq = loaded.blocks[0].ffn.net[0].proj.dequantize_weight()
    rel = (deq - original_w).norm() / original_w.norm()
    assert rel < 0.1, rel


def test_train_transform_makes_smoothing_learnable():
    model = tiny_wan()
    convert_model(model, QVGenConfig(rank=0, input_transform="smooth", train_transform=True), progress=False)
    x, t, e = wan_inputs()
    model(x, t, e, return_dict=False)[0].pow(2).mean().backward()
    g = model.blocks[0].attn1.to_q.smooth_log.grad
    assert g is not None and g.abs().sum() > 0


def test_rotation_reduces_activation_error_on_outlier_channels():
    """Per-token 4-bit error on inputs with a few outlier channels drops after a randomised Hadamard."""
    from qvgen.quantizers import fake_quant_act

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    x[:, :4] *= 30
    signs = random_signs(256, "l", 0)
    plain = (fake_quant_act(x, 1.0, 1.0, 4) - x).pow(2).mean()
    xr = rotate(x, signs, 256)
    rot = (unrotate(fake_quant_act(xr, 1.0, 1.0, 4), signs, 256) - x).pow(2).mean()
    assert rot < 0.5 * plain
