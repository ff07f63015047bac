"""Image fidelity metrics in torch: PSNR and SSIM (Gaussian window 11x11, sigma 1.5; Wang et al. 2004).

    psnr(a, b)            per-image PSNR in dB, images [B, C, H, W] (or [C, H, W]) in [0, data_range]
    ssim(a, b)            per-image mean SSIM over channels and window positions

Both return a float64 tensor [B]. Identical images give PSNR = inf and SSIM = 1. SSIM uses the "valid" window
positions only (no padding), the constants C1 = (0.01 L)^2, C2 = (0.03 L)^2 and the population (biased)
local variances, as in the original paper's reference implementation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "gaussian_window", "to_unit_range", "mean_finite"]


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (the reference model's output) -> [0, 1], float64 on the CPU."""
    return ((images.detach().to("cpu", torch.float64) + 1.0) / 2.0).clamp(0.0, 1.0)


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    return x.to(torch.float64)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image peak signal-to-noise ratio 10 log10(L^2 / MSE) in dB (inf where the images are identical)."""
    a, b = _as_batch(a), _as_batch(b.to(a.device))
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    out = 10.0 * torch.log10(data_range ** 2 / mse)  # mse == 0 -> inf
    return out


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64, device=None) -> torch.Tensor:
    """Normalised 2-D Gaussian window [size, size] (outer product of the 1-D one)."""
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2.0 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image structural similarity (mean of the SSIM map over channels and valid window positions)."""
    a, b = _as_batch(a), _as_batch(b.to(a.device))
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    _, channels, height, width = a.shape
    if height < window_size or width < window_size:
        raise ValueError(f"images {height}x{width} are smaller than the {window_size}x{window_size} window")
    w = gaussian_window(window_size, sigma, a.dtype, a.device)
    w = w.expand(channels, 1, window_size, window_size).contiguous()

    def filt(x):
        return F.conv2d(x, w, groups=channels)  # depthwise, "valid"

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(dim=1)


def mean_finite(values, cap: float = 100.0) -> float:
    """Mean of per-image PSNRs with inf (identical images) counted as ``cap`` dB, so the mean stays finite."""
    vals = [min(float(v), cap) for v in values]
    return sum(vals) / len(vals) if vals else math.nan
