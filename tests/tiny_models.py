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


def word_tokenizer(words: str):
    """A word-level fast tokenizer built in memory (T5-style pad/eos), standing in for UMT5/T5's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words.split():
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_wan_pipeline():
    """A complete WanPipeline with tiny random components and a locally built word-level tokenizer."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = word_tokenizer("a red green blue circle square moving left right up down the")
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, relative_attention_num_buckets=8
        )
    )
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=tiny_wan(), scheduler=scheduler
    )


def tiny_cogvideox_pipeline():
    """A complete CogVideoXPipeline with tiny random components (16×16 frames, 9 of them by default)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = word_tokenizer("a red green blue circle square moving right")
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, relative_attention_num_buckets=8
        )
    )
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=32,
        num_layers=1,
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        patch_size=1,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
    )
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )


def write_clips(folder, n: int = 3, frames: int = 5, size: int = 32, layout: str = "txt") -> None:
    """Small moving-square videos (GIF) with captions, in one of the supported caption layouts."""
    import json

    import imageio.v2 as imageio
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        video = np.zeros((frames, size, size, 3), dtype=np.uint8)
        for f in range(frames):
            x = 2 + 3 * f + i
            video[f, 10:18, x : x + 8, i % 3] = 255
        name = f"clip{i}.gif"
        imageio.mimsave(folder / name, list(video), duration=0.1)
        caption = f"a {['red', 'green', 'blue'][i % 3]} square moving right"
        rows.append({"file": name, "text": caption})
        if layout == "txt":
            (folder / f"clip{i}.txt").write_text(caption)
    if layout == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif layout == "csv":
        (folder / "metadata.csv").write_text("file,text\n" + "".join(f"{r['file']},{r['text']}\n" for r in rows))


def assert_matches_fake_quant(out, ref) -> None:
    """Packed (integer) model vs fake-quant model: equal up to float summation order.

    A ~1e-7 difference in a layer's input can flip one 4-bit rounding downstream, which moves a few
    outputs by a quantization step; so the check is on the bulk (median |Δ| ≤ 1e-5) and on the
    relative L2 gap (≤ 2e-3), both far below any systematic error (a wrong scale or zero point
    gives a relative gap above 1e-1).
    """
    diff = (out.float() - ref.float()).abs()
    rel = float(diff.norm() / ref.float().norm())
    assert float(diff.median()) <= 1e-5, f"median |Δ| = {float(diff.median()):.3g}"
    assert rel <= 2e-3, f"relative L2 gap {rel:.3g}"
