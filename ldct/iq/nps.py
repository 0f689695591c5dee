"""Noise power spectrum of noise-only CT images (AAPM TG-233; ICRU Report 87 §4).

    NPS(fx, fy) = Δx·Δy / (Nx·Ny) · ⟨ |DFT₂(ROI − trend)|² ⟩        [HU²·mm²]

over square ROIs that tile each noise-only image (non-overlapping, ``roi`` pixels a side, a
centred grid), each detrended by its mean (``"mean"``) or a fitted 2nd-order polynomial
(``"poly2"``, for residual low-frequency shading). Its integral over the frequency plane is the
detrended ROIs' variance, so ``sigma_hu`` = √(Σ NPS · Δfx·Δfy). The radial NPS averages the 2-D
NPS over annuli of width 1/(roi·Δ) (Δ the coarser pixel size), from the first annulus above 0 up
to the Nyquist frequency of the coarser axis, 1/(2Δ); DC is left out (detrending zeroes it).
``f_peak_per_mm`` is the radial maximum, ``f_avg_per_mm`` = Σ f·NPS_r / Σ NPS_r over the radial
bins (the mean frequency that shifts when a denoiser changes the noise grain).

Noise-only images come from a difference or an ensemble: with N repeated scans of one object,
:func:`remove_ensemble_mean` subtracts the mean image and scales by √(N/(N−1)), which restores
the per-scan variance that subtracting a mean of N noisy scans removes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ldct.errors import LdctError

MIN_IMAGES = 10


class IQError(LdctError, ValueError):
    """Input to an image-quality measurement is unusable; the message names it and the fix."""


@dataclass(frozen=True)
class NPSResult:
    nps_2d: np.ndarray  # [roi, roi], fftshifted, HU²·mm²
    fx: np.ndarray  # [roi] cycles/mm, fftshifted
    fy: np.ndarray
    f_radial: np.ndarray  # bin centres, cycles/mm
    nps_radial: np.ndarray
    sigma_hu: float
    n_rois: int

    @property
    def f_peak_per_mm(self) -> float:
        return float(self.f_radial[int(np.argmax(self.nps_radial))])

    @property
    def f_avg_per_mm(self) -> float:
        return float(np.sum(self.f_radial * self.nps_radial) / np.sum(self.nps_radial))

    def summary(self) -> dict[str, Any]:
        return {
            "sigma_hu": round(self.sigma_hu, 4),
            "f_peak_per_mm": round(self.f_peak_per_mm, 4),
            "f_avg_per_mm": round(self.f_avg_per_mm, 4),
            "n_rois": self.n_rois,
            "radial": {
                "f_per_mm": [round(float(f), 5) for f in self.f_radial],
                "nps": [float(f"{v:.6g}") for v in self.nps_radial],
            },
        }


def check_stack(images: Any, what: str, min_images: int = MIN_IMAGES) -> np.ndarray:
    """A [N, H, W] float64 stack of at least ``min_images`` finite images, or IQError naming ``what``."""
    stack = np.asarray(images, dtype=np.float64)
    if stack.ndim != 3:
        raise IQError(f"{what}: expected a stack [N, H, W] of images, got shape {stack.shape}")
    if stack.shape[0] < min_images:
        raise IQError(
            f"{what}: {stack.shape[0]} image(s); at least {min_images} are needed for a stable "
            "estimate (more realizations or repeated scans)"
        )
    if not np.isfinite(stack).all():
        raise IQError(f"{what}: contains NaN or infinite values")
    return stack


def remove_ensemble_mean(scans: np.ndarray) -> np.ndarray:
    """Noise-only images of N repeated scans of one object: (scan − mean) · √(N/(N−1))."""
    n = scans.shape[0]
    return (scans - scans.mean(axis=0, keepdims=True)) * np.sqrt(n / (n - 1))


def _poly2_basis(m: int) -> np.ndarray:
    y, x = np.mgrid[0:m, 0:m].astype(np.float64) / max(m - 1, 1) - 0.5
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1).reshape(m * m, 6)


def _rois(stack: np.ndarray, roi: int) -> np.ndarray:
    n, h, w = stack.shape
    ny, nx = h // roi, w // roi
    oy, ox = (h - ny * roi) // 2, (w - nx * roi) // 2
    tiles = stack[:, oy : oy + ny * roi, ox : ox + nx * roi].reshape(n, ny, roi, nx, roi)
    return tiles.transpose(0, 1, 3, 2, 4).reshape(n * ny * nx, roi, roi)


def nps(
    noise: Any,
    pixel_mm: tuple[float, float] | float,
    roi: int = 64,
    detrend: str = "mean",
    what: str = "noise images",
) -> NPSResult:
    """The NPS of noise-only images ``noise`` [N, H, W] in HU with pixel size (Δy, Δx) in mm."""
    stack = check_stack(noise, what)
    dy, dx = (float(pixel_mm), float(pixel_mm)) if np.isscalar(pixel_mm) else map(float, pixel_mm)
    if not (dy > 0 and dx > 0):
        raise IQError(f"{what}: pixel size must be positive, got {(dy, dx)} mm")
    if roi < 8 or roi > min(stack.shape[1:]):
        raise IQError(f"{what}: ROI of {roi} px does not fit images of {stack.shape[1:]} (8 px at least)")
    if detrend not in ("mean", "poly2"):
        raise IQError(f"detrend must be 'mean' or 'poly2', got {detrend!r}")
    tiles = _rois(stack, roi)
    if detrend == "mean":
        tiles = tiles - tiles.mean(axis=(1, 2), keepdims=True)
    else:
        basis = _poly2_basis(roi)
        coef, *_ = np.linalg.lstsq(basis, tiles.reshape(len(tiles), -1).T, rcond=None)
        tiles = tiles - (basis @ coef).T.reshape(tiles.shape)
    spectrum = np.abs(np.fft.fft2(tiles)) ** 2
    nps2 = np.fft.fftshift(spectrum.mean(axis=0)) * dx * dy / (roi * roi)
    fy = np.fft.fftshift(np.fft.fftfreq(roi, d=dy))
    fx = np.fft.fftshift(np.fft.fftfreq(roi, d=dx))
    step = 1.0 / (roi * max(dx, dy))
    nyquist = 1.0 / (2.0 * max(dx, dy))
    radius = np.hypot(*np.meshgrid(fy, fx, indexing="ij"))
    index = np.floor(radius / step + 0.5).astype(int)  # annulus k holds f in [(k-½)Δf, (k+½)Δf)
    top = int(np.floor(nyquist / step + 1e-9))
    counts = np.bincount(index.ravel(), minlength=top + 1)[1 : top + 1]
    sums = np.bincount(index.ravel(), weights=nps2.ravel(), minlength=top + 1)[1 : top + 1]
    keep = counts > 0
    f_radial = (np.arange(1, top + 1) * step)[keep]
    sigma = float(np.sqrt(nps2.sum() / (roi * dy * roi * dx)))
    return NPSResult(nps2, fx, fy, f_radial, sums[keep] / counts[keep], sigma, len(tiles))
