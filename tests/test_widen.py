"""Widened weights (one code per byte) give exactly the packed model's outputs on every backend."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_wan, wan_inputs

from qvgen import PackedLinear, QVGenConfig, convert_model, pack_model
from qvgen.widen import widen_weights


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_widened_model_matches_packed(backend: str) -> None:
    model = tiny_wan()
    cfg = QVGenConfig(rank=4, n_buckets=4, input_transform="hadamard")
    convert_model(model, cfg, progress=False)
    pack_model(model, cfg)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    for m in layers:
        m.backend = backend
    x, t, e = wan_inputs()
    with torch.no_grad():
        ref = model(x, t, e, return_dict=False)[0]
        w_ref = layers[0].dequantize_weight()
        assert widen_weights(model) == len(layers)
        assert layers[0].qweight.shape == (layers[0].out_features, layers[0].in_features)
        out = model(x, t, e, return_dict=False)[0]
        assert torch.equal(layers[0].dequantize_weight(), w_ref)
    assert torch.equal(out, ref)  # same integer codes, same arithmetic: bit-identical
    assert widen_weights(model) == 0  # idempotent
