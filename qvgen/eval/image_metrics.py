"""PSNR and SSIM of videos, frame by frame (SSIM: Wang et al. 2004, 11×11 Gaussian window, σ = 1.5)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

K1, K2 = 0.01, 0.03
WINDOW, SIGMA = 11, 1.5


def psnr(a: Tensor, b: Tensor, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB over the whole tensor (inf when identical)."""
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def _gaussian(size: int, sigma: float) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: Tensor, b: Tensor, data_range: float) -> float:
    """Mean SSIM of two videos `(C, F, H, W)` (or images `(C, H, W)`), over frames, channels and the valid
    windows (no padding); frames smaller than the window use a window as large as the frame."""
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() == 3:
        a, b = a.unsqueeze(1), b.unsqueeze(1)
    if a.dim() != 4:
        raise ValueError(f"ssim: expected (C, F, H, W) or (C, H, W), got {tuple(a.shape)}")
    c, f, h, w = a.shape
    size = min(WINDOW, h, w)
    g = _gaussian(size, SIGMA)
    kernel = (g[:, None] * g[None, :]).view(1, 1, size, size)
    x = a.double().permute(1, 0, 2, 3).reshape(f * c, 1, h, w)
    y = b.double().permute(1, 0, 2, 3).reshape(f * c, 1, h, w)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())
