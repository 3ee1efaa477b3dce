"""Training data: a folder of videos with captions, read into fixed-size clips.

Captions come from `metadata.jsonl` (`{"file": ..., "text": ...}` per line), `metadata.csv`
(columns `file`, `text`), or a sidecar `clip.txt` next to `clip.mp4`; the first found wins.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

VIDEO_EXTS = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif"}
FILE_KEYS = ("file", "file_name", "video", "path")
TEXT_KEYS = ("text", "caption", "prompt")


class DataError(ValueError):
    """The dataset folder or one of its files is not usable; the message names it."""


@dataclass
class Clip:
    path: Path
    caption: str


def _pick(row: dict, keys: tuple[str, ...], source: str, line: int) -> str:
    for k in keys:
        if k in row and row[k] not in (None, ""):
            return str(row[k])
    raise DataError(f"{source}:{line}: expected one of the columns {list(keys)}")


def _caption(row: dict) -> str | None:
    for k in TEXT_KEYS:
        if isinstance(row.get(k), str) and row[k].strip():
            return row[k].strip()
    return None


def _from_rows(root: Path, rows: list[tuple[int, dict]], source: str) -> list[Clip]:
    """Clips of metadata rows `(line, row)`; every row needs a video that exists and a non-empty caption."""
    clips, uncaptioned = [], []
    for line, row in rows:
        path = root / _pick(row, FILE_KEYS, source, line)
        if not path.is_file():
            raise DataError(f"{source}:{line}: video file {path} does not exist")
        caption = _caption(row)
        if caption is None:
            uncaptioned.append(line)
        clips.append(Clip(path, caption or ""))
    if uncaptioned:
        shown = ", ".join(map(str, uncaptioned[:10])) + (
            f" and {len(uncaptioned) - 10} more" if len(uncaptioned) > 10 else ""
        )
        raise DataError(
            f"{source}: {len(uncaptioned)} row(s) without a caption (line {shown}); expected a non-empty "
            f"{' or '.join(repr(k) for k in TEXT_KEYS)} in every row (caption dropout is --caption-dropout's job)"
        )
    return clips


def discover(root: str | Path) -> list[Clip]:
    """List the clips of a dataset folder with their captions; clear errors for empty/missing data."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    jsonl, csv_file = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.is_file():
        rows = []
        for i, line in enumerate(jsonl.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{jsonl}:{i}: not valid JSON ({e})") from None
        clips = _from_rows(root, rows, str(jsonl))
    elif csv_file.is_file():
        with csv_file.open(newline="") as f:
            reader = csv.DictReader(f)
            clips = _from_rows(root, [(reader.line_num, row) for row in reader], str(csv_file))
    else:
        clips = []
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() in VIDEO_EXTS:
                txt = p.with_suffix(".txt")
                if not txt.is_file():
                    raise DataError(f"{p}: no caption (expected {txt.name} next to it, or a metadata.jsonl/csv)")
                clips.append(Clip(p, txt.read_text().strip()))
    if not clips:
        raise DataError(f"{root}: no videos found (extensions {sorted(VIDEO_EXTS)})")
    return clips


def read_video(path: Path, num_frames: int, height: int, width: int, stride: int = 1) -> Tensor:
    """`num_frames` frames (every `stride`-th from the start), resized and centre-cropped; (C,F,H,W) in [-1, 1]."""
    import imageio.v2 as imageio

    try:
        reader = imageio.get_reader(str(path))
        frames = []
        for i, frame in enumerate(reader):
            if i % stride == 0:
                frames.append(np.asarray(frame)[..., :3])
            if len(frames) == num_frames:
                break
        reader.close()
    except Exception as e:  # noqa: BLE001 - imageio raises many types; all mean "cannot decode"
        raise DataError(f"{path}: cannot read video ({type(e).__name__}: {e})") from None
    if not frames:
        raise DataError(f"{path}: the video has no frames")
    while len(frames) < num_frames:  # short clips: hold the last frame
        frames.append(frames[-1])
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0  # C,F,H,W
    return resize_crop(video, height, width)


def resize_crop(video: Tensor, height: int, width: int) -> Tensor:
    """Scale the short side to cover (height, width), then centre-crop."""
    c, f, h, w = video.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    x = F.interpolate(video.permute(1, 0, 2, 3), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - height) // 2, (nw - width) // 2
    return x[:, :, top : top + height, left : left + width].permute(1, 0, 2, 3).contiguous()
