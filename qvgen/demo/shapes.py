"""Synthetic captioned video clips of one coloured shape moving on a dark background.

The demo's training and evaluation data: deterministic, tiny, and varied enough that a text-conditioned
video model has something to learn (colour, shape and motion all come from the caption; position and
size jitter come from the seed). Captions read like ``"a red circle moving left"`` or
``"a blue square growing"``; `make_clip` renders one as a ``(3, F, H, W)`` tensor in ``[-1, 1]``
(channels, frames, height, width — the layout a Wan transformer takes for one sample).

The vocabulary is 8 colours × 3 shapes × 6 motions = 144 captions. Shapes are anti-aliased by 4×
supersampling so that edges are smooth at 32×32.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

FRAMES = 8
SIZE = 32

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.12),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (0.98, 0.9, 0.1),
    "cyan": (0.1, 0.9, 0.95),
    "magenta": (0.95, 0.15, 0.9),
    "orange": (1.0, 0.55, 0.05),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "growing", "shrinking")
BACKGROUND = (0.06, 0.06, 0.08)  # near-black, in [0, 1]

_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ClipSpec:
    """What a caption asks for."""

    colour: str
    shape: str
    motion: str

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {list(COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {list(SHAPES)}")
        if self.motion not in MOTIONS:
            raise ValueError(f"unknown motion {self.motion!r}; expected one of {list(MOTIONS)}")

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} {self.motion}"


def all_specs() -> list[ClipSpec]:
    """Every caption of the vocabulary, in a fixed order."""
    return [ClipSpec(c, s, m) for c, s, m in itertools.product(COLOURS, SHAPES, MOTIONS)]


def all_captions() -> list[str]:
    return [s.caption for s in all_specs()]


def parse_caption(caption: str) -> ClipSpec:
    """``"a red circle moving left"`` → ``ClipSpec("red", "circle", "moving left")`` (case and an optional
    leading article are ignored); a `ValueError` names what is not understood."""
    words = caption.lower().replace(",", " ").replace(".", " ").split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    if len(words) < 3:
        raise ValueError(f"caption {caption!r}: expected '<colour> <shape> <motion>', e.g. 'a red circle moving left'")
    return ClipSpec(words[0], words[1], " ".join(words[2:]))


def sample_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` captions, balanced over the vocabulary: whole seeded permutations of all 144, then a partial one."""
    rng = random.Random(seed)
    base = all_captions()
    out: list[str] = []
    while len(out) < n:
        perm = base[:]
        rng.shuffle(perm)
        out.extend(perm)
    return out[:n]


def _trajectory(spec: ClipSpec, rng: random.Random, frames: int, size: int) -> list[tuple[float, float, float]]:
    """(centre x, centre y, half-size) per frame, in pixels (pixel centres at 0.5, 1.5, …).

    The seed places the path anywhere it fits inside the frame: Wan's transformer only knows relative
    (RoPE) positions, so what it can learn is the shape and its motion, not where in the frame it is.
    """
    r = size * rng.uniform(0.16, 0.19)
    lo, hi = r + 0.5, size - r - 0.5  # keep the whole shape inside the frame
    if spec.motion in ("growing", "shrinking"):
        r_small, r_big = size * rng.uniform(0.07, 0.09), size * rng.uniform(0.25, 0.28)
        margin = r_big * 1.15 + 0.5
        cx, cy = (rng.uniform(margin, size - margin) for _ in range(2))
        radii = [r_small + (r_big - r_small) * i / max(frames - 1, 1) for i in range(frames)]
        if spec.motion == "shrinking":
            radii.reverse()
        return [(cx, cy, rr) for rr in radii]
    travel = size * 0.4  # total displacement over the clip
    sign = -1.0 if spec.motion in ("moving left", "moving up") else 1.0
    start = rng.uniform(lo + travel, hi) if sign < 0 else rng.uniform(lo, hi - travel)
    other = rng.uniform(lo, hi)
    along = [start + sign * travel * i / max(frames - 1, 1) for i in range(frames)]
    if spec.motion in ("moving left", "moving right"):
        return [(a, other, r) for a in along]
    return [(other, a, r) for a in along]


def _mask(shape: str, cx: Tensor, cy: Tensor, r: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
    """Inside-test on the supersampled grid; cx, cy, r are (F, 1, 1)."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) <= r * 0.85  # same area feel as the circle
    # triangle pointing up, centred on its centroid, circumradius ~1.15 r
    rr = r * 1.15
    inside_slopes = dx.abs() * (math.sqrt(3) / 2) - dy * 0.5 <= rr * 0.5
    above_base = dy <= rr * 0.5
    return inside_slopes & above_base


def make_clip(
    caption: str | ClipSpec, seed: int = 0, frames: int = FRAMES, height: int = SIZE, width: int | None = None
) -> Tensor:
    """Render ``caption`` as a ``(3, frames, height, width)`` float32 clip in ``[-1, 1]``.

    The seed picks the start position, the size and (for growing/shrinking) the centre; the same
    caption and seed always give the same clip. Geometry is set on a square of side ``min(height, width)``
    and centred in a non-square frame.
    """
    spec = caption if isinstance(caption, ClipSpec) else parse_caption(caption)
    width = height if width is None else width
    side = min(height, width)
    rng = random.Random(f"{spec.caption}|{seed}")
    traj = torch.tensor(_trajectory(spec, rng, frames, side), dtype=torch.float32)
    traj[:, 0] += (width - side) / 2
    traj[:, 1] += (height - side) / 2
    s = _SUPERSAMPLE
    ys = ((torch.arange(height * s, dtype=torch.float32) + 0.5) / s).view(1, -1, 1)
    xs = ((torch.arange(width * s, dtype=torch.float32) + 0.5) / s).view(1, 1, -1)
    cx, cy, r = (traj[:, i].view(-1, 1, 1) for i in range(3))
    cover = _mask(spec.shape, cx, cy, r, xs, ys).float()  # (F, H*s, W*s)
    cover = F.avg_pool2d(cover.unsqueeze(1), s).squeeze(1)  # (F, H, W) coverage in [0, 1]
    fg = torch.tensor(COLOURS[spec.colour]).view(3, 1, 1, 1)
    bg = torch.tensor(BACKGROUND).view(3, 1, 1, 1)
    video = bg + (fg - bg) * cover.unsqueeze(0)
    return video * 2 - 1


def make_batch(captions: list[str], seed: int = 0, **kwargs) -> Tensor:
    """``(B, 3, F, H, W)``: caption ``i`` rendered with seed ``seed * 1_000_003 + i``."""
    return torch.stack([make_clip(c, seed=seed * 1_000_003 + i, **kwargs) for i, c in enumerate(captions)])
