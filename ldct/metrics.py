"""Image-quality metrics in Hounsfield units, in the two conventions of docs/DESIGN.md §3.

- ``full``:   HU clipped to [-1024, 3072], data range 4096.
- ``window``: HU clipped to the abdomen window [-160, 240], data range 400 (the paper's convention).

SSIM uses an 11-tap Gaussian window (σ = 1.5), K1 = 0.01, K2 = 0.03 and population covariance,
and averages over the pixels whose window lies inside the image, exactly like
``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=R)``. Every function takes a batch and returns one value
per image (shape [N]); computation is float64 so the agreement with scikit-image is ~1e-10.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

FULL_RANGE = (-1024.0, 3072.0)
WINDOW_RANGE = (-160.0, 240.0)
METRIC_NAMES = ("psnr_window", "ssim_window", "psnr_full", "ssim_full", "rmse_hu")

_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # skimage: int(truncate * sigma + 0.5) with truncate = 3.5 -> 11 taps
_K1, _K2 = 0.01, 0.03


def _as_batch(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Any of [H,W], [N,H,W], [N,1,H,W] (tensor or array) -> float64 tensor [N,1,H,W]."""
    t = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    t = t.detach().to(dtype=torch.float64)
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[:, None]
    elif t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"expected [H,W], [N,H,W] or [N,1,H,W] HU images, got shape {tuple(t.shape)}")
    return t


def _pair(pred, target, hu_range: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor, float]:
    p, t = _as_batch(pred), _as_batch(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} != target shape {tuple(t.shape)}")
    lo, hi = hu_range
    return p.clamp(lo, hi), t.clamp(lo, hi), hi - lo


def _psnr(pred, target, hu_range: tuple[float, float]) -> torch.Tensor:
    p, t, data_range = _pair(pred, target, hu_range)
    mse = (p - t).pow(2).flatten(1).mean(1)
    # Identical images: infinite PSNR, as skimage reports.
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_kernel(device: torch.device) -> torch.Tensor:
    x = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-(x**2) / (2 * _SSIM_SIGMA**2))
    g = g / g.sum()
    return g


def _blur_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # Separable Gaussian with no padding: skimage crops the border of width RADIUS after filtering,
    # so the padded pixels never reach the mean, and a "valid" convolution gives the same values.
    x = F.conv2d(x, g.view(1, 1, 1, -1))
    return F.conv2d(x, g.view(1, 1, -1, 1))


def _ssim(pred, target, hu_range: tuple[float, float]) -> torch.Tensor:
    p, t, data_range = _pair(pred, target, hu_range)
    if min(p.shape[-2:]) < 2 * _SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {tuple(p.shape[-2:])}")
    g = _gaussian_kernel(p.device)
    mu_p, mu_t = _blur_valid(p, g), _blur_valid(t, g)
    var_p = _blur_valid(p * p, g) - mu_p**2
    var_t = _blur_valid(t * t, g) - mu_t**2
    cov = _blur_valid(p * t, g) - mu_p * mu_t
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    ssim_map = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return ssim_map.flatten(1).mean(1)


def psnr_window(pred_hu, target_hu) -> torch.Tensor:
    """PSNR [dB] per image, abdomen window [-160, 240] HU, data range 400."""
    return _psnr(pred_hu, target_hu, WINDOW_RANGE)


def psnr_full(pred_hu, target_hu) -> torch.Tensor:
    """PSNR [dB] per image, HU clipped to [-1024, 3072], data range 4096."""
    return _psnr(pred_hu, target_hu, FULL_RANGE)


def ssim_window(pred_hu, target_hu) -> torch.Tensor:
    """SSIM per image, abdomen window [-160, 240] HU, data range 400."""
    return _ssim(pred_hu, target_hu, WINDOW_RANGE)


def ssim_full(pred_hu, target_hu) -> torch.Tensor:
    """SSIM per image, HU clipped to [-1024, 3072], data range 4096."""
    return _ssim(pred_hu, target_hu, FULL_RANGE)


def rmse_hu(pred_hu, target_hu) -> torch.Tensor:
    """Root-mean-square error in HU per image (no clipping)."""
    p, t = _as_batch(pred_hu), _as_batch(target_hu)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} != target shape {tuple(t.shape)}")
    return (p - t).pow(2).flatten(1).mean(1).sqrt()


METRICS: dict[str, Callable[..., torch.Tensor]] = {
    "psnr_window": psnr_window,
    "ssim_window": ssim_window,
    "psnr_full": psnr_full,
    "ssim_full": ssim_full,
    "rmse_hu": rmse_hu,
}


def all_metrics(pred_hu, target_hu) -> dict[str, torch.Tensor]:
    """All five metrics, each a float64 tensor of shape [N]."""
    return {name: fn(pred_hu, target_hu) for name, fn in METRICS.items()}


class MetricAccumulator:
    """Averages per-image metrics over many batches (mean over images, not over batches)."""

    def __init__(self) -> None:
        self._sums = dict.fromkeys(METRIC_NAMES, 0.0)
        self.count = 0

    def update(self, pred_hu, target_hu) -> dict[str, torch.Tensor]:
        values = all_metrics(pred_hu, target_hu)
        for name, v in values.items():
            self._sums[name] += float(v.sum())
        self.count += int(next(iter(values.values())).numel())
        return values

    def mean(self) -> dict[str, float]:
        if self.count == 0:
            return dict.fromkeys(METRIC_NAMES, math.nan)
        return {name: s / self.count for name, s in self._sums.items()}
