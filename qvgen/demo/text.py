"""A tiny deterministic text encoder standing in for Wan's UMT5 in the demo.

A prompt is lower-cased and split into words; each word gets a fixed pseudo-random vector (seeded by
a CRC32 of the word, so every word — in or out of the demo vocabulary — has one, and adding words never
changes the others), plus a sinusoidal position code. Sequences are padded with zero vectors to
`MAX_TOKENS` (longer prompts are truncated), as Wan pads UMT5 output with zeros; the empty prompt
(caption dropout, the unconditional branch of classifier-free guidance) is therefore all zeros.
No weights, no downloads, no state.
"""

from __future__ import annotations

import math
import re
import zlib
from functools import lru_cache

import torch
from torch import Tensor

TEXT_DIM = 32
MAX_TOKENS = 8
POSITION_SCALE = 0.5
_SEED = 20240601


def tokenize(prompt: str) -> list[str]:
    """Lower-case words (letters, digits, apostrophes); everything else separates."""
    return re.findall(r"[a-z0-9']+", prompt.lower())


@lru_cache(maxsize=4096)
def _word_vector(word: str, dim: int) -> Tensor:
    g = torch.Generator().manual_seed(_SEED ^ zlib.crc32(word.encode("utf-8")))
    return torch.randn(dim, generator=g)


def word_embedding(word: str, dim: int = TEXT_DIM) -> Tensor:
    """The fixed ``(dim,)`` vector of one word (entries ~ N(0, 1))."""
    return _word_vector(word, dim).clone()


def position_code(n: int, dim: int = TEXT_DIM) -> Tensor:
    """``(n, dim)`` sinusoidal position code, scaled by `POSITION_SCALE`."""
    pos = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(-math.log(100.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    code = torch.zeros(n, dim)
    code[:, 0::2] = torch.sin(pos * freq)
    code[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return POSITION_SCALE * code


def encode_prompt(prompt: str, max_tokens: int = MAX_TOKENS, dim: int = TEXT_DIM) -> Tensor:
    """One prompt → ``(max_tokens, dim)``; rows after the last word are zero."""
    words = tokenize(prompt)[:max_tokens]
    out = torch.zeros(max_tokens, dim)
    if words:
        out[: len(words)] = torch.stack([_word_vector(w, dim) for w in words]) + position_code(len(words), dim)
    return out


def encode_prompts(prompts: list[str] | str, max_tokens: int = MAX_TOKENS, dim: int = TEXT_DIM) -> Tensor:
    """Prompts → ``(B, max_tokens, dim)`` float32, the ``encoder_hidden_states`` of the demo teacher."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        return torch.zeros(0, max_tokens, dim)
    return torch.stack([encode_prompt(p, max_tokens, dim) for p in prompts])
