"""Task transfer function from a circular rod (AAPM TG-233 §5; Richard et al., Med Phys 2012).

The edge of a rod of known centre and radius: every pixel within ``span_mm`` of the edge is put
at its radial distance r from the centre, the edge spread function is the mean HU in bins of
``oversample`` per pixel (a rod samples r at sub-pixel offsets, so the ESF is finer than the
grid), the LSF its derivative, Hann-windowed, and the TTF |FFT(LSF)| normalised at f = 0.
``f50`` / ``f10`` are where it falls to 0.5 / 0.1 (linear interpolation). A nonlinear denoiser's
TTF depends on the contrast and the noise, hence one TTF per rod and the mean image of N
realizations (the noise is averaged out of the edge, not out of what the denoiser did).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ldct.iq.nps import IQError


@dataclass(frozen=True)
class TTFResult:
    f_per_mm: np.ndarray
    ttf: np.ndarray
    contrast_hu: float

    def frequency_at(self, level: float) -> float:
        below = np.nonzero(self.ttf < level)[0]
        if not len(below) or below[0] == 0:
            return float("nan")
        i = int(below[0])
        f0, f1, t0, t1 = self.f_per_mm[i - 1], self.f_per_mm[i], self.ttf[i - 1], self.ttf[i]
        return float(f0 + (t0 - level) * (f1 - f0) / (t0 - t1))

    def summary(self) -> dict[str, Any]:
        """f50/f10 in mm⁻¹; None where the TTF stays above the level up to the Nyquist frequency
        (``nyquist_per_mm``), e.g. an image whose edges only the pixel grid blurs."""

        def level(value: float) -> float | None:
            return None if np.isnan(value) else round(value, 4)

        return {
            "contrast_hu": round(self.contrast_hu, 2),
            "f50_per_mm": level(self.frequency_at(0.5)),
            "f10_per_mm": level(self.frequency_at(0.1)),
            "nyquist_per_mm": round(float(self.f_per_mm[-1]), 4),
        }


def ttf_from_rod(
    image: np.ndarray,
    center_px: tuple[float, float],
    radius_mm: float,
    pixel_mm: float,
    span_mm: float | None = None,
    oversample: int = 10,
) -> TTFResult:
    """TTF of the rod centred at ``center_px`` (row, column) with radius ``radius_mm``."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise IQError(f"a TTF needs one 2-D image (the mean of the realizations), got shape {image.shape}")
    span = span_mm if span_mm is not None else min(radius_mm, 12.0 * pixel_mm)
    rows, cols = np.indices(image.shape, dtype=np.float64)
    r = np.hypot(rows - center_px[0], cols - center_px[1]) * pixel_mm
    near = np.abs(r - radius_mm) <= span
    if near.sum() < 50:
        raise IQError(f"rod at {center_px} px, radius {radius_mm} mm: too few pixels near its edge")
    width = pixel_mm / oversample
    edges = np.arange(radius_mm - span, radius_mm + span + width, width)
    index = np.digitize(r[near], edges) - 1
    valid = (index >= 0) & (index < len(edges) - 1)
    counts = np.bincount(index[valid], minlength=len(edges) - 1)
    sums = np.bincount(index[valid], weights=image[near][valid], minlength=len(edges) - 1)
    filled = counts > 0
    centres = 0.5 * (edges[:-1] + edges[1:])
    esf = np.interp(centres, centres[filled], sums[filled] / counts[filled])
    inside, outside = esf[:oversample].mean(), esf[-oversample:].mean()
    contrast = float(inside - outside)
    if abs(contrast) < 1e-6:
        raise IQError(f"rod at {center_px} px: no contrast across its edge")
    lsf = -np.gradient(esf, width) / contrast  # unit area for an ideal edge
    lsf *= np.hanning(len(lsf))
    n_fft = 1 << int(np.ceil(np.log2(len(lsf) * 4)))
    spectrum = np.abs(np.fft.rfft(lsf, n=n_fft))
    freqs = np.fft.rfftfreq(n_fft, d=width)
    keep = freqs <= 1.0 / (2.0 * pixel_mm)
    return TTFResult(freqs[keep], spectrum[keep] / spectrum[0], contrast)
