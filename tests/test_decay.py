"""Rank-decay schedule: exact ranks and mask values at chosen steps; Φ gone at the end."""

from __future__ import annotations

import math

import pytest
import torch

from qvgen import QVGenConfig, QVGenLinear, RankDecaySchedule


def test_phase_ranks_and_total():
    s = RankDecaySchedule(32, 444, 0.5)
    assert s.phase_ranks == [32, 16, 8, 4, 2, 1]
    assert s.total_steps == 6 * 444
    assert [s.rank_at(p * 444) for p in range(7)] == [32, 16, 8, 4, 2, 1, 0]
    assert s.rank_at(443) == 32 and s.rank_at(444) == 16 and s.rank_at(10**6) == 0


@pytest.mark.parametrize(
    ("step", "ones", "alpha_k"),
    [(0, 16, 0), (100, 16, 100), (443, 16, 443), (444, 8, 0), (444 + 222, 8, 222), (5 * 444 + 10, 0, 10)],
)
def test_mask_values(step, ones, alpha_k):
    s = RankDecaySchedule(32, 444, 0.5)
    m = s.mask_at(step)
    rank = s.rank_at(step)
    alpha = (1 + math.cos(math.pi * alpha_k / 444)) / 2
    assert torch.all(m[:ones] == 1.0)
    torch.testing.assert_close(m[ones:rank], torch.full((rank - ones,), alpha))
    assert torch.all(m[rank:] == 0.0)


def test_mask_cosine_endpoints():
    s = RankDecaySchedule(8, 10, 0.5)
    assert s.mask_at(0)[7] == 1.0
    assert s.mask_at(5)[7] == pytest.approx(0.5)
    assert 0 < s.mask_at(9)[7] < 0.03


def _layer(rank=8):
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 16)
    return QVGenLinear.from_linear(lin, QVGenConfig(rank=rank, n_buckets=1))


def test_apply_halves_by_resvd_and_removes_phi():
    layer = _layer(8)
    model = torch.nn.Sequential(layer)
    s = RankDecaySchedule(8, 4, 0.5)
    ranks = []
    for step in range(s.total_steps + 2):
        before = layer.phi_product() if layer.phi_down is not None else None
        changed = s.apply(model, step)
        if changed and layer.phi_down is not None:
            # the halving keeps the best rank-r approximation of the masked product
            u, sv, vh = torch.linalg.svd(before)
            r = layer.rank
            best = (u[:, :r] * sv[:r]) @ vh[:r]
            torch.testing.assert_close(layer.phi_product(), best, atol=1e-5, rtol=1e-4)
        ranks.append(layer.rank)
    assert ranks[0] == 8 and ranks[4] == 4 and ranks[8] == 2 and ranks[12] == 1
    assert layer.phi_down is None and layer.phi_up is None and layer.rank == 0
    assert "phi_down" not in dict(layer.named_parameters())


def test_apply_is_idempotent_for_resume():
    a, b = _layer(8), _layer(8)
    s = RankDecaySchedule(8, 4, 0.5)
    for step in range(7):
        s.apply(a, step)
    for step in range(7):
        s.apply(b, step)
        s.apply(b, step)  # applying a step twice (a resumed run) changes nothing
    torch.testing.assert_close(a.phi_product(), b.phi_product())
    torch.testing.assert_close(a.phi_mask, b.phi_mask)


def test_svd_init_lowers_error():
    layer = _layer(8)
    w = layer.weight.detach()
    err_q = (layer.weight_quantizer(w) - w).pow(2).sum()
    err_phi = (layer.weight_quantizer(w) + layer.phi_product() - w).pow(2).sum()
    assert err_phi < 0.6 * err_q
    x = torch.randn(32, 24)
    y_fp = torch.nn.functional.linear(x, w, layer.bias)
    with torch.no_grad():
        y_q = layer(x)
        layer.phi_mask.zero_()
        y_noq = layer(x)
    assert (y_q - y_fp).pow(2).mean() < (y_noq - y_fp).pow(2).mean()


def test_randomized_svd_matches_full_svd_on_large_layers():
    """Large layers use `svd_lowrank`; its top components match the exact SVD (decaying spectrum)."""
    from qvgen.layers import top_svd

    g = torch.Generator().manual_seed(0)
    m = torch.randn(400, 160, generator=g) @ torch.diag(torch.logspace(0, -3, 160)) @ torch.randn(160, 600, generator=g)
    u, s, vh = top_svd(m, 32)
    uf, sf, vhf = torch.linalg.svd(m, full_matrices=False)
    torch.testing.assert_close(s, sf[:32], rtol=1e-4, atol=1e-4 * float(sf[0]))
    best = (uf[:, :32] * sf[:32]) @ vhf[:32]
    assert ((u * s) @ vh - best).norm() / m.norm() < 1e-3
