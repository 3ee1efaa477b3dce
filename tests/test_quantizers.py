"""Quantizer math against independently written formulas; STE and LSQ gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qvgen.quantizers import (
    ActQuantizer,
    WeightQuantizer,
    fake_quant_act,
    init_weight_qparams,
    round_ste,
)


def np_weight_fq(w: np.ndarray, s: np.ndarray, z: np.ndarray, bits: int) -> np.ndarray:
    q = np.clip(np.round(w / s + z), 0, 2**bits - 1)
    return s * (q - z)


def np_act_fq(x: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    qmax = 2**bits - 1
    out = np.empty_like(x)
    for i, row in enumerate(x):  # one token at a time, the plain way
        mn, mx = row.min() * lo, row.max() * hi
        s = max((mx - mn) / qmax, 1e-5)
        z = min(max(np.round(-mn / s), 0), qmax)
        q = np.clip(np.round(row / s) + z, 0, qmax)
        out[i] = s * (q - z)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_fake_quant_matches_formula(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 40)
    wq = WeightQuantizer(16, 40, bits)
    wq.init_from(w)
    got = wq(w).detach().numpy()
    want = np_weight_fq(w.numpy().astype(np.float64), wq.scale.detach().numpy(), wq.zero.detach().numpy(), bits)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert len(np.unique(np.round((got / wq.scale.detach().numpy()), 4)[0])) <= 2**bits


def test_weight_zero_point_is_real_not_rounded():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    s, z = init_weight_qparams(w, 4)
    assert (z - z.round()).abs().max() > 1e-3, "LSQ+ zero point must stay a real number"


def test_clip_search_picks_the_best_ratio():
    """The searched (s, z) have a lower |err|^2.4 per row than any fixed ratio tried independently."""
    torch.manual_seed(1)
    w = torch.randn(8, 128) * torch.linspace(0.1, 3, 8)[:, None]
    w[0, 0] = 25.0  # an outlier makes clipping worthwhile
    s, z = init_weight_qparams(w, 4)
    wn = w.double().numpy()

    def err(ratio):
        mn, mx = wn.min(1, keepdims=True) * ratio, wn.max(1, keepdims=True) * ratio
        ss = (mx - mn) / 15
        return (np.abs(np_weight_fq(wn, ss, -mn / ss, 4) - wn) ** 2.4).sum(1)

    best = np.min(np.stack([err(1 - 0.01 * i) for i in range(80)]), axis=0)
    got = (np.abs(np_weight_fq(wn, s.double().numpy(), z.double().numpy(), 4) - wn) ** 2.4).sum(1)
    np.testing.assert_allclose(got, best, rtol=1e-4)
    assert err(1.0)[0] > got[0] * 1.01, "the outlier row should have chosen a clip ratio below 1"


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_act_fake_quant_matches_formula(bits):
    torch.manual_seed(0)
    x = torch.randn(6, 48) * 3 + 0.5
    got = fake_quant_act(x, 0.9, 0.8, bits).numpy()
    np.testing.assert_allclose(got, np_act_fq(x.double().numpy(), 0.9, 0.8, bits), atol=1e-5)


def test_act_quantizer_constant_token_is_finite():
    x = torch.full((3, 16), 2.5)
    x[1] = 0.0
    y = ActQuantizer(4, 1)(x)
    assert torch.isfinite(y).all()


def test_act_quantizer_clip_init_and_bucket_selection():
    aq = ActQuantizer(4, n_buckets=5, fixed_clip=0.95, logit_init=math.log(0.95 / 0.05))
    np.testing.assert_allclose(aq.clip_factors().detach().numpy(), 0.9025, atol=1e-6)
    with torch.no_grad():
        aq.clip_logits[3] = torch.tensor([0.0, 0.0])  # factor 0.475 in bucket 3
    x = torch.randn(2, 4, 32)
    y_b3 = aq(x, 3)
    np.testing.assert_allclose(y_b3.detach().numpy()[0], np_act_fq(x[0].double().numpy(), 0.475, 0.475, 4), atol=1e-5)
    y_mixed = aq(x, torch.tensor([3, 0]))  # per-sample buckets
    torch.testing.assert_close(y_mixed[0], y_b3[0])
    torch.testing.assert_close(y_mixed[1], aq(x, 0)[1])


def test_round_ste_gradient_is_identity():
    x = torch.linspace(-2, 2, 11, requires_grad=True)
    round_ste(x * 1.3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1.3))


def test_lsq_gradient_scale_and_ste():
    """d/ds and d/dz of the fake quantizer, by hand: STE inside the clamp, LSQ-scaled.

    The weights are placed at chosen points of the code grid (`w = (t - z)·s`), away from rounding
    boundaries and from the clamp's edges, so which branch each element takes is known without
    deciding it in floating point: a value on a boundary would make the test depend on round-off.
    """
    out_f, bits = 4, 4
    g = torch.Generator().manual_seed(0)
    inside_t = torch.tensor([1.2, 3.7, 6.1, 8.8, 11.3, 13.6])  # round to 1..14: inside the clamp
    clipped_t = torch.tensor([-2.3, -0.8, 15.9, 19.4])  # round to < 0 or > 15: clipped
    t = torch.cat([inside_t, clipped_t]).expand(out_f, -1) + 0.05 * torch.rand(out_f, 10, generator=g)
    s = (0.01 + 0.05 * torch.rand(out_f, 1, generator=g)).double()
    z = (2 + 3 * torch.rand(out_f, 1, generator=g)).double()
    wd = (t.double() - z) * s
    wq = WeightQuantizer(out_f, 10, bits)
    with torch.no_grad():
        wq.scale.copy_(s)
        wq.zero.copy_(z)
    wq(wd.float()).sum().backward()
    inside = torch.zeros(out_f, 10, dtype=torch.bool)
    inside[:, :6] = True
    q = torch.clamp(t.double().round(), 0, 15)
    # y = s (q - z); inside: q = round(w/s + z) with STE → dy/ds = (q - z) - w/s, dy/dz = 0
    # clipped: q constant → dy/ds = q - z, dy/dz = -s
    ds = torch.where(inside, (q - z) - wd / s, q - z).sum(1, keepdim=True)
    dz = torch.where(inside, torch.zeros_like(wd), -s.expand_as(wd)).sum(1, keepdim=True)
    gs = 1 / math.sqrt(10 * 15)
    torch.testing.assert_close(wq.scale.grad.double(), ds * gs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wq.zero.grad.double(), dz * gs, rtol=1e-4, atol=1e-6)


def test_act_clip_logits_receive_gradient():
    aq = ActQuantizer(4, n_buckets=3)
    x = torch.randn(4, 64) * 5
    x[:, 0] = 40  # an outlier so clipping matters
    (aq(x, 2) - x).pow(2).sum().backward()
    assert aq.clip_logits.grad[2].abs().sum() > 0
    assert aq.clip_logits.grad[[0, 1]].abs().sum() == 0


def test_clamp_passes_gradient_at_the_edges_on_every_torch():
    """torch 2.14 stopped passing clamp's gradient at the bounds; quantizers land there (codes rounded
    to exactly qmax, clip factors starting at 1), so `clamp_ste_edges` keeps the older rule everywhere:
    the value of `torch.clamp`, gradient 1 inside and on the bounds, 0 outside."""
    from qvgen.quantizers import clamp_ste_edges

    x = torch.tensor([-1.0, 0.0, 3.0, 15.0, 16.0], requires_grad=True)
    y = clamp_ste_edges(x, 0, 15)
    assert torch.equal(y, torch.clamp(x.detach(), 0, 15))
    y.backward(torch.arange(1.0, 6.0))
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]
    c = torch.ones(3, requires_grad=True)  # a clip factor at its upper bound still trains
    clamp_ste_edges(c, 0.25, 1.0).sum().backward()
    assert c.grad.tolist() == [1.0, 1.0, 1.0]
