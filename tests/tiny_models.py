"""Tiny diffusers transformers and inputs built in code (no downloads), shared by the tests."""

from __future__ import annotations

import torch


def tiny_wan(**overrides):
    from diffusers import WanTransformer3DModel

    cfg = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=128,
        num_layers=2,
        rope_max_seq_len=32,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    return WanTransformer3DModel(**cfg)


def wan_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 3, 8, 8, generator=g)
    t = torch.linspace(100.0, 900.0, batch)
    e = torch.randn(batch, 5, 32, generator=g)
    return x, t, e
