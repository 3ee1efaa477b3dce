"""The activation side's two numerical choices (issue #16): the clip logits' gradient through the zero
point's rounding (`zero_point_grad`), and the input transform computed in fp32 as the kernels do."""

from __future__ import annotations

import pytest
import torch
from qvgen_kernels import reference
from torch import nn

from qvgen.config import ConfigError, QVGenConfig
from qvgen.layers import QVGenLinear
from qvgen.quantizers import ActQuantizer, act_qparams, fake_quant_act
from qvgen.transforms import rotate

# (γ_lower, γ_upper): the init logit(0.95), strong lower clipping, strong upper clipping
CLIP_LOGITS = [(2.944, 2.944), (0.5, 3.0), (3.0, 0.0)]
H = 0.1  # logit step: wide enough to average over single rounding flips of the 262k elements


def _skewed_tokens() -> torch.Tensor:
    """4096 tokens × 64 channels with an asymmetric distribution (a long upper tail), as after a GELU."""
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    return x + 0.3 * x.pow(2)


def _loss(x: torch.Tensor, logits: torch.Tensor, mode: str = "ste") -> torch.Tensor:
    """Reconstruction error of the per-token 4-bit quantizer with clip factors 0.95·sigmoid(γ)."""
    c = 0.95 * torch.sigmoid(logits)
    return (fake_quant_act(x, c[0], c[1], 4, zero_point_grad=mode) - x).pow(2).mean()


def _autograd(x: torch.Tensor, logits: tuple[float, float], mode: str) -> torch.Tensor:
    g = torch.tensor(logits, requires_grad=True)
    _loss(x, g, mode).backward()
    return g.grad


def _central_difference(f, logits: tuple[float, float]) -> torch.Tensor:
    out = []
    for i in range(2):
        up, down = torch.tensor(logits), torch.tensor(logits)
        up[i] += H
        down[i] -= H
        out.append((float(f(up)) - float(f(down))) / (2 * H))
    return torch.tensor(out)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("logits", CLIP_LOGITS)
def test_ste_clip_gradient_matches_finite_difference(logits) -> None:
    """The "ste" gradient follows the loss's actual slope in γ (averaged over the rounding flips a step of 0.1 crosses).

    Measured relative gaps: 0.09, 0.13, 0.01 for the three settings (a straight-through estimate, not an
    exact derivative); 0.2 leaves margin while a wrong sign or a dropped path (0.8 for "none" at (0.5, 3.0)) fails.
    """
    x = _skewed_tokens()
    with torch.no_grad():
        fd = _central_difference(lambda g: _loss(x, g), logits)
    assert _rel(_autograd(x, logits, "ste"), fd) < 0.2


@pytest.mark.parametrize("logits", CLIP_LOGITS)
def test_no_zero_point_gradient_is_the_frozen_zero_point_derivative(logits) -> None:
    """The "none" gradient (the authors' code) is the loss's slope with the zero point held at its integer."""
    x = _skewed_tokens()
    c0 = 0.95 * torch.sigmoid(torch.tensor(logits))
    _, z0 = act_qparams(x, c0[0], c0[1], 4)

    def frozen_zero_loss(g: torch.Tensor) -> torch.Tensor:
        c = 0.95 * torch.sigmoid(g)
        s, _ = act_qparams(x, c[0], c[1], 4)
        q = torch.clamp(torch.round(x / s) + z0, 0, 15)
        return (s * (q - z0) - x).pow(2).mean()

    with torch.no_grad():
        fd_frozen = _central_difference(frozen_zero_loss, logits)
        fd = _central_difference(lambda g: _loss(x, g), logits)
    grad = _autograd(x, logits, "none")
    assert _rel(grad, fd_frozen) < 0.2
    if logits == (0.5, 3.0):  # with strong lower clipping the two definitions part (the case)
        assert _rel(grad, fd) > 0.5


def test_zero_point_grad_leaves_the_forward_unchanged() -> None:
    x = torch.randn(7, 33) * 2
    a, b = ActQuantizer(4, 2, zero_point_grad="ste"), ActQuantizer(4, 2, zero_point_grad="none")
    assert torch.equal(a(x, 1), b(x, 1))


def test_zero_point_grad_is_validated() -> None:
    with pytest.raises(ConfigError, match="zero_point_grad"):
        QVGenConfig(zero_point_grad="exact")
    with pytest.raises(ValueError, match="zero_point_grad"):
        ActQuantizer(4, 1, zero_point_grad="exact")
    layer = QVGenLinear.from_linear(nn.Linear(8, 4), QVGenConfig(rank=0, zero_point_grad="none"))
    assert layer.act_quantizer.zero_point_grad == "none"


# ---------------------------------------------------------------------------------------------
# the input transform in fp32, as the kernels compute it
# ---------------------------------------------------------------------------------------------
def _layer(transform: str) -> QVGenLinear:
    torch.manual_seed(0)
    lin = nn.Linear(256, 48)
    cfg = QVGenConfig(rank=0, n_buckets=1, input_transform=transform, train_transform=True)
    layer = QVGenLinear.from_linear(lin, cfg, name="blocks.0.ffn.net.0.proj")
    if layer.smooth_log is not None:  # non-trivial scales, as calibration leaves them
        layer.set_smoothing(torch.rand(256) * 4 + 0.1, 0.5)
    return layer


def _outlier_tokens_bf16() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 256, generator=g) * (1 + 6 * torch.rand(256, generator=g).pow(4))
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("transform", ["hadamard", "smooth", "smooth_hadamard"])
def test_bf16_training_codes_match_kernel_reference(transform: str) -> None:
    """Under bf16 autocast the fake-quant path quantizes the same integers the packed model's kernels do.

    Both sides run the same fp32 operations in the same order on the same bf16 input, so the codes
    are equal, not merely close; the bf16 transform this replaces changes a few percent of them.
    """
    layer = _layer(transform)
    x = _outlier_tokens_bf16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        v = layer.transform_input(x)
        codes = layer.act_quantizer.int_codes(v)
        x_hat = layer.quantize_input(x)
    t = layer.export_tensors()
    lo, hi = t["act_clip"][0].tolist()
    q, s, z, _ = reference.quantize_activation(
        x,
        lo,
        hi,
        4,
        input_signs=t.get("input_signs"),
        rot_block=layer.rot_block if "input_signs" in t else 0,
        smooth=t.get("smooth"),
    )
    assert v.dtype == torch.float32
    assert torch.equal(codes, q)
    assert x_hat.dtype == torch.bfloat16  # cast back: the layer's dtype flow is unchanged
    assert torch.equal(x_hat, (s * (q.float() - z)).to(torch.bfloat16))
    # the transform in bf16 (before issue #16) quantizes other integers: the check above has teeth
    with torch.no_grad():
        v16 = x if layer.input_signs is None else rotate(x, layer.input_signs, layer.rot_block)
        s16 = layer.smooth_scale()
        v16 = v16 if s16 is None else v16 / s16.to(torch.bfloat16)
        assert float((layer.act_quantizer.int_codes(v16) != q).float().mean()) > 0.005
