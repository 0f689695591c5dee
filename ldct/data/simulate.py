"""Projection-domain low-dose simulation, calibrated to each slice's own noise.

Low dose (docs/DESIGN.md §3): the image is converted to linear attenuation and forward projected
(parallel beam); photon counts with Poisson statistics plus Gaussian electronic noise are drawn
around the clean line integrals, and only the *difference* between the noisy and the clean line
integrals is reconstructed (filtered back-projection) and added to the image. The full-dose target
therefore carries no reconstruction artefact of the simulator; the low-dose image differs from it
by realistic, spatially varying, correlated CT noise (streaks behind bone, more noise through the
long axis of the body).

Dose-corrected noise insertion (Yu et al. 2012; Zeng et al. 2015). A real full-dose image already
holds the noise of dose 1, with line-integral variance ``(I + s^2) / I^2`` for ``I = I0 e^-p``
counts and electronic noise ``s``. Dose ``d`` has ``(d I + s^2) / (d I)^2``. The difference is the
variance of counts at flux ``I0 d / (1 - d)`` with electronic noise ``s sqrt((1 + d) / (1 - d))``,
so that is what is inserted (:func:`insertion_flux`): the total noise is then that of dose ``d``.
A noise-free input (a phantom's true anatomy) is simulated directly (``noise_free=True``) at flux
``I0 d`` with electronic noise ``s``.

Calibration (:func:`calibrate_flux`). The formula holds only if the source's noise *is* the
simulator's dose-1 noise at ``I0``. A real slice has its own: ``I0`` is therefore chosen per slice
so that the simulator's dose-1 noise in its soft tissue equals the slice's native noise σ
(:func:`ldct.data.noise.estimate_noise_sigma`); then "dose d" is the effective dose d,
var(full) / var(low) = d in soft tissue. Phantoms (noise-free truth) keep ``I0_FULL_DOSE``.

Exposure control: like a scanner's tube-current modulation, the flux of a slice is scaled by
``exp(0.5 (p90 - 2.7))`` (``p90`` the 90th percentile of its line integrals through the body):
the small phantoms and CT_small keep their calibrated noise, and a 35 cm abdomen is not
photon-starved. A calibrated ``i0`` is the argument that, with this factor, gives the native noise.

Angular sampling: ``ceil(pi N / 2)`` views over 180 degrees for an N-pixel image (the Nyquist
rate of parallel-beam CT), so the noise has no view-aliasing streaks. ``i0`` is the flux per ray
at the reference sampling of 180 views; with V views each view gets ``i0 * 180 / V`` photons and
an electronic noise σ of ``s sqrt(180 / V)`` per reading (the reading integrates 180 / V of the
reference time), so the dose and both noise terms do not depend on the angular sampling.

Texture: the noise image is reconstructed with a ramp times a Hann window that reaches zero at
``FBP_CUTOFF_PER_MM`` cycles/mm (or the pixel Nyquist if lower), like a soft-tissue kernel, so its
noise power spectrum peaks at the same spatial frequency (~0.31 x the cut-off) for any pixel size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ldct.data.noise import (
    ESTIMATOR,
    NoiseEstimateError,
    added_noise_sigma,
    estimate_noise_sigma,
    noise_sigma_in,
    quiet_windows,
    soft_tissue_mask,
)
from ldct.errors import LdctError

# Linear attenuation of water at the ~70 keV effective energy of a 120 kVp spectrum [1/mm].
MU_WATER_PER_MM = 0.0192
I0_FULL_DOSE = 1.5e5
# Standard deviation of the detector's electronic noise, in photon counts per reading at the
# reference sampling (per reading at V views: times sqrt(180 / V)). 5, not the 10 used before:
# at 10 a noise-free 30 cm water disk's quarter/full noise ratio was 2.12 (2.00 without
# electronic noise), at 5 it is ~2.03 (benchmarks/calibration.py), i.e. electronic noise is a
# few percent of the quarter-dose variance behind 30 cm of water.
ELECTRONIC_NOISE = 5.0
# The view count at which i0 is defined (see the module docstring).
REFERENCE_VIEWS = 180
# Reconstruction filter of the noise image: a ramp times a Hann window reaching zero at 0.6
# cycles/mm (or the pixel Nyquist if lower). A soft-tissue kernel such as the Mayo data's B30 has
# little response left at ~0.6-0.7 mm⁻¹; 0.6 sits just above the 0.58 mm⁻¹ Nyquist of the coarsest
# built-in slice (0.86 mm), so every slice gets the same texture in mm (its NPS peak ~0.18 mm⁻¹).
FBP_CUTOFF_PER_MM = 0.6
FBP_FILTER = "hann-0.6/mm"
# Exposure control: the flux of a slice scales with exp(AEC_STRENGTH (p90 - AEC_REFERENCE_P)), p90
# the 90th percentile of its line integrals through the body; the reference is the phantoms' (and
# CT_small's) ~2.7, so their calibrated noise stays. Strength 0.5: like clinical exposure control,
# a large patient gets more photons but still more noise (full compensation, strength 1, put the
# 35 cm abdomen 3 dB *less* noisy than the small phantoms; none, 0, photon-starved it at 15 dB).
AEC_REFERENCE_P = 2.7
AEC_STRENGTH = 0.5
INSERTION_METHOD = (
    "projection-domain noise insertion for a full-dose input (Yu et al. 2012): Poisson counts at "
    "flux I0*d/(1-d) per ray, electronic noise E*sqrt((1+d)/(1-d)), FBP of the noisy minus clean "
    "line integrals added to the input; ceil(pi*N/2) views, flux per view I0*180/views, electronic "
    "noise per reading E*sqrt(180/views); ramp x Hann to 0 at 0.6/mm; exposure control flux x "
    "exp(0.5 (p90 - 2.7)); I0 calibrated per real slice to its native noise"
)


def views_for(n: int) -> int:
    """Views over 180 degrees for an N-pixel image: ceil(pi N / 2)."""
    return int(math.ceil(math.pi * n / 2.0))


def insertion_flux(dose: float, i0: float, electronic_noise: float, noise_free: bool) -> tuple[float, float]:
    """(flux per ray, electronic noise std) whose noise, added to the input, gives dose ``dose``."""
    if noise_free:
        return i0 * dose, electronic_noise
    return i0 * dose / (1.0 - dose), electronic_noise * math.sqrt((1.0 + dose) / (1.0 - dose))


# --------------------------------------------------------------------------- projection


def hu_to_mu(hu: np.ndarray) -> np.ndarray:
    """HU -> linear attenuation [1/mm]; below -1000 HU (padding, noise in air) clipped to 0."""
    return np.maximum(MU_WATER_PER_MM * (1.0 + np.asarray(hu, dtype=np.float64) / 1000.0), 0.0)


def _line_integrals(mu_px: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Line integrals [D, A] of a square image of per-pixel attenuation, on the detector grid of
    ``skimage.transform.radon(circle=False)`` (D = padded diagonal, centre D // 2), for the
    angles ``theta`` (degrees in [0, 180)).

    Only the photon statistics depend on these values (the image itself is never reconstructed
    from them), so they are computed at half resolution, at that grid's own ceil(pi N / 2)
    views, and interpolated linearly along the detector and the angle: ~8x less work than the
    full projection, and an error of a fraction of a pixel in where the noise is strongest."""
    from skimage.transform import radon

    n = mu_px.shape[0]
    d_full = n + int(np.ceil(np.sqrt(2) * n - n))
    if n < 64:
        return radon(mu_px, theta, circle=False)
    m = n + (n % 2)
    padded = np.zeros((m, m)) if m != n else mu_px
    if m != n:
        padded[:n, :n] = mu_px
    # Block sum = mean attenuation x twice the path length per coarse pixel.
    small = padded.reshape(m // 2, 2, m // 2, 2).mean(axis=(1, 3)) * 2.0
    coarse = min(len(theta), views_for(m // 2))
    sino = radon(small, np.linspace(0.0, 180.0, coarse, endpoint=False), circle=False)  # [Ds, Ac]
    ds = sino.shape[0]
    # Along the detector: full-resolution bins sit at half-bin steps of the coarse detector.
    pos = ds // 2 + (np.arange(d_full) - d_full // 2) / 2.0
    inside = (pos >= 0) & (pos <= ds - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, ds - 2)
    f = (pos - lo)[:, None]
    det = np.where(inside[:, None], sino[lo] * (1 - f) + sino[lo + 1] * f, 0.0)  # [D, Ac]
    # Along the angle, periodic: the view at 180 degrees is the one at 0 mirrored on the detector.
    centre = d_full // 2
    mirror = 2 * centre - np.arange(d_full)
    ok = (mirror >= 0) & (mirror < d_full)
    wrap = np.where(ok, det[np.clip(mirror, 0, d_full - 1), 0], 0.0)
    ext = np.concatenate([det, wrap[:, None]], axis=1)  # [D, Ac + 1]
    t = np.asarray(theta, float) / (180.0 / coarse)
    j = np.clip(np.floor(t).astype(int), 0, coarse - 1)
    g = t - j
    return ext[:, j] * (1 - g) + ext[:, j + 1] * g


def exposure_factor(line_integrals: np.ndarray) -> float:
    """Flux multiplier of exposure control for a slice with these line integrals."""
    body = line_integrals[line_integrals > 0.1]
    if body.size == 0:
        return 1.0
    return float(np.exp(AEC_STRENGTH * (np.percentile(body, 90) - AEC_REFERENCE_P)))


def reconstruction_filter(
    size: int, pixel_size_mm: float, cutoff_per_mm: float = FBP_CUTOFF_PER_MM
) -> np.ndarray:
    """The frequency response [size] of :data:`FBP_FILTER` on a detector of ``pixel_size_mm`` bins:
    skimage's discrete ramp (Kak & Slaney eq. 61, no DC bias) times a Hann window reaching zero at
    ``min(cutoff_per_mm, Nyquist)`` cycles/mm."""
    n = np.concatenate((np.arange(1, size / 2 + 1, 2, dtype=int), np.arange(size / 2 - 1, 0, -2, dtype=int)))
    f = np.zeros(size)
    f[0] = 0.25
    f[1::2] = -1 / (np.pi * n) ** 2
    ramp = 2 * np.real(np.fft.fft(f))
    freq = np.abs(np.fft.fftfreq(size, d=pixel_size_mm))
    cutoff = min(cutoff_per_mm, 0.5 / pixel_size_mm)
    window = np.where(freq < cutoff, 0.5 * (1.0 + np.cos(np.pi * freq / cutoff)), 0.0)
    return ramp * window


def _fbp(sino: np.ndarray, theta: np.ndarray, n: int, pixel_size_mm: float, filter_name: str) -> np.ndarray:
    from skimage.transform import iradon

    if filter_name != FBP_FILTER:
        return iradon(sino, theta, output_size=n, filter_name=filter_name, circle=False)
    # skimage's own padding, then our filter in cycles/mm, then its unfiltered back-projection.
    d = sino.shape[0]
    size = max(64, int(2 ** np.ceil(np.log2(2 * d))))
    spectrum = np.fft.fft(np.pad(sino, ((0, size - d), (0, 0))), axis=0)
    filtered = np.real(np.fft.ifft(spectrum * reconstruction_filter(size, pixel_size_mm)[:, None], axis=0))[
        :d
    ]
    return iradon(filtered, theta, output_size=n, filter_name=None, circle=False)


def simulate_low_dose(
    image_hu: np.ndarray,
    dose: float,
    rng: np.random.Generator,
    i0: float = I0_FULL_DOSE,
    electronic_noise: float = ELECTRONIC_NOISE,
    pixel_size_mm: float = 0.7,
    views: int | None = None,
    filter_name: str = FBP_FILTER,
    noise_free: bool = False,
) -> np.ndarray:
    """Dose-``dose`` version (float32 HU) of a slice: image + FBP(noisy - clean line integrals).

    By default ``image_hu`` is a full-dose scan that already holds dose-1 noise, and only the
    missing noise is inserted (dose 1 returns the image unchanged). ``noise_free=True``: the image
    is the true anatomy, simulated directly at dose ``dose``. ``i0`` is the full-dose flux per ray
    at 180 views (for a real slice: :func:`calibrate_flux`, so that dose means effective dose);
    ``views`` defaults to ceil(pi N / 2). The image may be non-square; it is padded
    with air for the projection.
    """
    image_hu = np.asarray(image_hu, dtype=np.float32)
    if image_hu.ndim != 2:
        raise ValueError(f"simulate_low_dose expects one [H, W] slice, got shape {image_hu.shape}")
    if not 0 < dose <= 1:
        raise ValueError(f"dose must be a fraction of the full dose in (0, 1], got {dose}")
    if not pixel_size_mm > 0:
        raise ValueError(f"pixel_size_mm must be positive, got {pixel_size_mm}")
    if dose == 1.0 and not noise_free:
        return image_hu.copy()  # it already is a full-dose image
    h, w = image_hu.shape
    n = max(h, w)
    views = views_for(n) if views is None else int(views)
    flux, sigma_e = insertion_flux(dose, i0, electronic_noise, noise_free)
    mu_px = np.zeros((n, n))
    mu_px[:h, :w] = hu_to_mu(image_hu) * pixel_size_mm
    theta = np.linspace(0.0, 180.0, views, endpoint=False)
    p = _line_integrals(mu_px, theta)
    flux *= REFERENCE_VIEWS / views * exposure_factor(p)
    sigma_e *= math.sqrt(REFERENCE_VIEWS / views)

    expected = flux * np.exp(-p)
    counts = rng.poisson(expected).astype(np.float64)
    if sigma_e > 0:
        counts += rng.normal(0.0, sigma_e, size=counts.shape)
    # A scanner clamps non-positive readings before the log; so do we (photon starvation).
    counts = np.maximum(counts, 1.0)
    delta_p = np.log(expected / counts)  # noisy minus clean line integral

    noise_px = _fbp(delta_p, theta, n, pixel_size_mm, filter_name)
    noise_hu = noise_px[:h, :w] / pixel_size_mm / MU_WATER_PER_MM * 1000.0
    return (image_hu + noise_hu).astype(np.float32)


def embed_in_body(
    hu: np.ndarray,
    pixel_size_mm: float,
    body_mm: tuple[float, float] = (160.0, 120.0),
    margin_mm: float = 15.0,
) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Place a cropped slice (CT_small is an 85 mm field) in a water-equivalent body outline,
    centred left-right with its lower (posterior) edge ``margin_mm`` inside the skin.

    The X-rays of a real scan crossed the whole body, not only the stored crop, and the noise
    depends on that path. The default body is the size of the built-in phantoms (whose noise
    level is calibrated), so CTSMALL and the phantoms share one noise level. Returns the canvas
    and the crop's location in it."""
    h, w = hu.shape
    half = np.array(body_mm) / 2.0 / pixel_size_mm  # semi-axes in pixels (x, y)
    size = int(2 * np.ceil(max(half[0], half[1], h, w) * 1.05)) + 2
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2.0
    canvas = np.where((xx / half[0]) ** 2 + (yy / half[1]) ** 2 <= 1.0, 0.0, -1000.0).astype(np.float32)
    bottom = int(round((size - 1) / 2.0 + half[1] - margin_mm / pixel_size_mm))
    top = max(bottom - h, 0)
    left = (size - w) // 2
    where = (slice(top, top + h), slice(left, left + w))
    canvas[where] = hu
    return canvas, where


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """The flux of one real slice (:func:`flux_calibration`)."""

    native_sigma_hu: float  # the slice's own noise in its soft tissue
    i0: float  # the flux at which the simulator's dose-1 noise equals it
    reference_sigma_hu: float  # the simulator's dose-1 noise at the reference flux
    reference_i0: float

    @property
    def source_dose(self) -> float:
        """The slice's own dose relative to the reference flux: (σ_ref / σ_native)²."""
        return (self.reference_sigma_hu / self.native_sigma_hu) ** 2


def flux_calibration(
    full_hu: np.ndarray,
    pixel_size_mm: float,
    native_sigma_hu: float,
    electronic_noise: float = ELECTRONIC_NOISE,
    reference_i0: float = I0_FULL_DOSE,
    mask: np.ndarray | None = None,
    seed: int = 0,
    dose: float | None = None,
    iterations: int = 2,
) -> Calibration:
    """:func:`calibrate_flux` with the reference noise it measured on the way."""
    full_hu = np.asarray(full_hu, dtype=np.float32)
    if not native_sigma_hu > 0:
        raise NoiseEstimateError(f"native noise must be > 0 HU to calibrate the flux, got {native_sigma_hu}")
    if dose is not None and not 0 < dose < 1:
        raise ValueError(f"dose must be in (0, 1) to calibrate an insertion, got {dose}")
    mask = soft_tissue_mask(full_hu, pixel_size_mm) if mask is None else mask
    noise_sigma_in(full_hu, mask, pixel_size_mm, "the slice")  # enough soft tissue, or a clear error
    windows = quiet_windows(full_hu, mask, pixel_size_mm)
    # What the simulator must produce at the right flux: dose-1 noise equal to the native noise,
    # or (a dose given) the inserted noise that brings the native noise to dose d.
    gain = 1.0 if dose is None else math.sqrt((1.0 - dose) / dose)
    target = native_sigma_hu * gain
    i0, sigma_ref = float(reference_i0), 0.0
    # A third of the views: the noise level does not depend on the angular sampling (flux and
    # electronic noise per view scale with it; HEAD693 and ABDOMEN: within 1 % of all views),
    # and each calibration draw costs a third of a full one.
    views = max(16, views_for(max(full_hu.shape)) // 3)
    for k in range(iterations):
        # Measured over the pixels the native noise was measured on (the full dose's quiet
        # windows), as the RMS local std of the noise image, not the mode (a noise-only image's
        # mode is unstable where the noise varies across a large body). sigma^2 ~ 1/i0
        # (+ an electronic term ~ 1/i0^2 and the log's curvature at low counts), so one rescaling
        # gets close and a second one absorbs the rest.
        rng = np.random.default_rng([seed, 0xCA1B, k])
        kwargs = {
            "i0": i0,
            "electronic_noise": electronic_noise,
            "pixel_size_mm": pixel_size_mm,
            "views": views,
        }
        if dose is None:
            noise = simulate_low_dose(full_hu, 1.0, rng, noise_free=True, **kwargs) - full_hu
        else:
            noise = simulate_low_dose(full_hu, dose, rng, **kwargs) - full_hu
        sigma = added_noise_sigma(noise, windows, pixel_size_mm)
        if k == 0:
            sigma_ref = sigma / gain
        i0 *= (sigma / target) ** 2
    return Calibration(float(native_sigma_hu), float(i0), float(sigma_ref), float(reference_i0))


def calibrate_flux(
    full_hu: np.ndarray,
    pixel_size_mm: float,
    native_sigma_hu: float,
    electronic_noise: float = ELECTRONIC_NOISE,
    reference_i0: float = I0_FULL_DOSE,
    mask: np.ndarray | None = None,
    seed: int = 0,
    dose: float | None = None,
) -> float:
    """The ``i0`` (per ray at 180 views, before exposure control) at which the simulator's dose-1
    noise in this slice's soft tissue equals ``native_sigma_hu`` (from
    :func:`ldct.data.noise.estimate_noise_sigma`). ``simulate_low_dose(full_hu, d, rng, i0=...)``
    then gives effective dose d: var(full) / var(low) = d in soft tissue. With ``dose`` the
    insertion at that dose is calibrated instead (its noise sqrt(1/d - 1) x native): the same
    flux up to the log's curvature at low counts, which it absorbs (the effective dose of a
    large body comes out ~0.21 instead of 0.25 otherwise). ``mask``: the pixels to measure on
    (default: the soft tissue of ``full_hu``; an embedded crop passes its own)."""
    return flux_calibration(
        full_hu, pixel_size_mm, native_sigma_hu, electronic_noise, reference_i0, mask, seed, dose
    ).i0


def effective_dose(
    full_hu: np.ndarray, low_hu: np.ndarray, pixel_size_mm: float, mask: np.ndarray | None = None
) -> float:
    """Measured effective dose of a pair: var(full) / var(low) = σ_full² / (σ_full² + σ_ins²) in the
    full dose's soft tissue, σ_full its native noise and σ_ins that of the inserted noise
    ``low - full``: σ_full by the native-noise estimator, σ_ins as the root mean local variance
    over the windows that estimator settled on (:func:`ldct.data.noise.quiet_windows`). The
    inserted noise is measured on its own because it is independent of the native noise (the
    variances add), while a mode over windows of ``low`` would pick other windows than over
    ``full`` (anatomy and the inserted noise's spatial variation do not line up)."""
    full_hu = np.asarray(full_hu, dtype=np.float64)
    mask = soft_tissue_mask(full_hu, pixel_size_mm) if mask is None else mask
    full = noise_sigma_in(full_hu, mask, pixel_size_mm, "the full dose")
    windows = quiet_windows(full_hu, mask, pixel_size_mm)
    inserted = added_noise_sigma(np.asarray(low_hu, dtype=np.float64) - full_hu, windows, pixel_size_mm)
    return float(full**2 / (full**2 + inserted**2))


class SourceTooNoisy(LdctError, ValueError):
    """A source slice already noisier than the requested dose allows."""


def insert_calibrated(
    full_hu: np.ndarray,
    pixel_size_mm: float,
    dose: float,
    rng: np.random.Generator,
    electronic_noise: float = ELECTRONIC_NOISE,
    seed: int = 0,
    embed: bool = False,
    what: str = "slice",
    check_source: bool = True,
) -> tuple[np.ndarray, dict[str, float | str]]:
    """Effective-dose ``dose`` version of a real full-dose slice and its calibration record.

    Native σ estimated, ``i0`` calibrated to it (:func:`flux_calibration`), the noise inserted at
    that flux, the effective dose measured on the result. ``embed``: the slice is a crop of a
    larger body (CT_small), simulated inside :func:`embed_in_body`'s outline and measured on the
    crop. A source whose own dose relative to the reference flux, (σ_ref / σ_native)², is not
    above ``dose`` raises :class:`SourceTooNoisy` (``what`` names it): it is no routine-dose
    image, and its "dose d" copy would be far below d of a routine dose (``check_source=False``
    makes it anyway and records ``source_dose``: the built-in set's CT_small)."""
    full_hu = np.asarray(full_hu, dtype=np.float32)
    if not 0 < dose < 1:
        raise ValueError(f"dose must be a fraction of the full dose in (0, 1), got {dose}")
    native = estimate_noise_sigma(full_hu, pixel_size_mm, what)
    crop_mask = soft_tissue_mask(full_hu, pixel_size_mm)
    if embed:
        image, where = embed_in_body(full_hu, pixel_size_mm)
        mask = np.zeros(image.shape, bool)
        mask[where] = crop_mask
    else:
        image, where, mask = full_hu, (slice(None), slice(None)), crop_mask
    cal = flux_calibration(image, pixel_size_mm, native, electronic_noise, mask=mask, seed=seed, dose=dose)
    if check_source and cal.source_dose <= dose:
        raise SourceTooNoisy(
            f"{what}: its native noise ({native:.1f} HU in soft tissue) is that of dose {cal.source_dose:.2f} "
            f"of the reference full dose ({cal.reference_sigma_hu:.1f} HU at I0 {cal.reference_i0:g}), not "
            f"above the requested dose {dose:g}; ask for a dose below {cal.source_dose:.2f} or use a "
            f"routine-dose series"
        )
    low = simulate_low_dose(
        image, dose, rng, i0=cal.i0, electronic_noise=electronic_noise, pixel_size_mm=pixel_size_mm
    )
    low = low[where]
    record: dict[str, float | str] = {
        "native_sigma_hu": round(native, 3),
        "i0": float(f"{cal.i0:.4g}"),
        "reference_sigma_hu": round(cal.reference_sigma_hu, 3),
        "source_dose": round(cal.source_dose, 4),
        "effective_dose": round(effective_dose(full_hu, low, pixel_size_mm, crop_mask), 4),
        "pixel_size_mm": float(f"{pixel_size_mm:.6g}"),
        "estimator": ESTIMATOR,
    }
    return low, record
