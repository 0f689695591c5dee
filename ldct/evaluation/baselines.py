"""The classical baselines of every table: Gaussian smoothing and BM3D.

Tuned rows have one parameter, picked on the validation split from a fixed grid by mean
``psnr_body`` (each slice in its anatomy window), never on the split being scored
(docs/DESIGN.md §3): the Gaussian's sigma in pixels and BM3D's ``sigma_psd`` in HU. A choice on
the grid's edge extends the grid (up to ``EXTEND_STEPS`` steps, geometric with the grid's own
last ratio); one still on the edge is flagged (``at_grid_edge``), since the grid then decided the
value. An untuned row beside them: BM3D given each LDCT slice's own noise level, measured by
:func:`ldct.data.noise.estimate_noise_sigma` on the input alone (what a user without a tuning set
would do).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldct.config import HUNormalization
from ldct.data.cache import ldct_home
from ldct.data.noise import ESTIMATOR, NoiseEstimateError, estimate_noise_sigma
from ldct.evaluation.slices import SlicePair, hu_pairs
from ldct.metrics import MetricAccumulator, body_mask, psnr_body, psnr_window

# Gaussian baseline: sigmas (pixels) tried on the validation slices; 0 = the LDCT input itself.
DEFAULT_SIGMAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)


# BM3D: sigma_psd candidates in HU. Quarter-dose noise is ~10-60 HU (each slice's figure is in the
# table), but CT noise is correlated, so the best white-noise sigma_psd lies above the noise std:
# on the built-in head slice the best was the old grid's top (70 HU), so the grid goes on to 140
# (where the head slice's optimum sits again: that slice rewards heavy smoothing). BM3D costs 8-14 s of CPU per 512x512 slice
# (benchmarks/bm3d_eval.py); BM3DCache makes that a one-time cost per slice and sigma.
DEFAULT_BM3D_SIGMAS_HU = (10.0, 20.0, 35.0, 50.0, 70.0, 100.0, 140.0)


# Validation slices used to tune each classical method (spread evenly over the split), whole by
# default (DEFAULT_TUNE_CROP = 0). A central crop is 16x cheaper for BM3D at 128² of 512², but it
# can hold one tissue only: on the real head slice's central 128² (uniform brain) the Gaussian's
# best σ was 3 px, which then scored 19.9 dB against the LDCT input's 26.3 on the abdomen test
# panel; tuned on the whole slice σ = 0.75 px scored 26.6 (measured on the quick cache).
# `data.tune_crop` sets a crop (the smoke profile does, to keep the tests fast).
DEFAULT_TUNE_SLICES = 4


DEFAULT_TUNE_CROP = 0

# A tuned value on its grid's edge adds up to this many candidates beyond that edge.
EXTEND_STEPS = 3


def gaussian_denoise(hu: np.ndarray | torch.Tensor, sigma: float) -> np.ndarray | torch.Tensor:
    """Gaussian smoothing over the last two (image) axes; returns the input's type/device/dtype.

    The classical baseline the learned denoiser must beat; ``sigma`` in pixels, 0 = a copy.
    """
    from scipy import ndimage

    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    is_tensor = isinstance(hu, torch.Tensor)
    arr = hu.detach().cpu().numpy() if is_tensor else np.asarray(hu)
    if arr.ndim < 2:
        raise ValueError(f"expected an image with at least 2 dimensions, got shape {arr.shape}")
    sigmas = (0.0,) * (arr.ndim - 2) + (float(sigma), float(sigma))
    out = ndimage.gaussian_filter(arr.astype(np.float64), sigmas, mode="reflect").astype(arr.dtype)
    if is_tensor:
        return torch.from_numpy(out).to(device=hu.device, dtype=hu.dtype)
    return out


def bm3d_denoise(hu: np.ndarray, sigma_psd: float) -> np.ndarray:
    """BM3D (Dabov et al. 2007; the ``bm3d`` package, both stages) of a HU slice [H, W].

    ``sigma_psd`` is the white-noise std in HU. Slow: 8-14 s of CPU for a 512x512 CT slice
    (benchmarks/bm3d_eval.py).
    """
    import bm3d

    if sigma_psd <= 0:
        raise ValueError(f"BM3D sigma_psd must be > 0 HU, got {sigma_psd}")
    arr = np.asarray(hu, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"BM3D takes one [H, W] slice, got shape {arr.shape}")
    return np.asarray(bm3d.bm3d(arr, sigma_psd=float(sigma_psd)), dtype=np.float32)


class BM3DCache:
    """BM3D outputs on disk, keyed by the input slice's bytes, ``sigma_psd`` and the bm3d version.

    BM3D costs seconds per 512² slice and every report, ``ldct eval`` and ``ldct repeat`` runs it
    on the same validation and test slices with the same grid: the second run reads .npy files
    (``allow_pickle=False``: nothing loaded runs code). Keyed on content, not on file names, so a
    re-simulated cache can never hit a stale entry. Lives in ``$LDCT_HOME/bm3d`` (delete it to
    clear); a directory that cannot be written only costs the recomputation, with one warning.
    """

    def __init__(self, root: Path | str | None = None) -> None:
        if root is None:
            root = ldct_home() / "bm3d"
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self._warned = False

    def _key(self, arr: np.ndarray, sigma_psd: float) -> str:
        import hashlib
        from importlib.metadata import version

        digest = hashlib.sha256()
        digest.update(f"{arr.shape}|{arr.dtype}|{float(sigma_psd)!r}|bm3d {version('bm3d')}|".encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
        return digest.hexdigest()[:32]

    def __call__(self, hu: np.ndarray, sigma_psd: float) -> np.ndarray:
        arr = np.asarray(hu, dtype=np.float32)
        path = self.root / f"{self._key(arr, sigma_psd)}.npy"
        try:
            out = np.load(path, allow_pickle=False)
            if out.shape == arr.shape and out.dtype == np.float32:
                self.hits += 1
                return out
        except (OSError, ValueError):
            pass  # absent or unreadable: recompute, and overwrite it below
        out = bm3d_denoise(arr, sigma_psd)
        self.misses += 1
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            with tmp.open("wb") as fh:
                np.save(fh, out, allow_pickle=False)
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
        except OSError as exc:
            if not self._warned:
                print(
                    f"[ldct] BM3D cache {self.root} not writable ({exc}); recomputing each time",
                    file=sys.stderr,
                )
                self._warned = True
        return out


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False)


def _score_candidate(
    method: Callable[[np.ndarray, float], np.ndarray], pairs: Sequence[SlicePair], value: float, bar: Any
) -> tuple[float, float]:
    """(mean psnr_body, mean psnr_window) of ``method`` at ``value`` over ``pairs``."""
    body, window = [], []
    for pair in pairs:
        out = method(pair.low, value)
        body.append(float(psnr_body(out, pair.full, pair.window)[0]))
        window.append(float(psnr_window(out, pair.full)[0]))
        bar.update(1)
    return sum(body) / len(body), sum(window) / len(window)


def _beyond(candidates: list[float], upper: bool, lower_bound: float) -> float | None:
    """The next candidate past the grid's upper or lower end (geometric, the grid's end ratio)."""
    if len(candidates) < 2:
        return None
    if upper:
        a, b = candidates[-2], candidates[-1]
        return b * (b / a) if a > 0 else b + (b - a)
    a, b = candidates[0], candidates[1]
    nxt = a * (a / b) if a > 0 else a - (b - a)
    return nxt if nxt > lower_bound else None


def tune_parameter(
    method: Callable[[np.ndarray, float], np.ndarray],
    pairs: Sequence[SlicePair],
    candidates: Sequence[float],
    name: str,
    progress: bool = False,
    extend_steps: int = EXTEND_STEPS,
    lower_bound: float = 0.0,
) -> dict[str, Any]:
    """Grid search of ``method``'s one parameter by mean ``psnr_body`` over ``pairs`` (validation).

    ``candidates`` ascending. A best value at the grid's end extends it (up to ``extend_steps``
    candidates, never to ``lower_bound`` or below: the Gaussian's σ = 0 is the input itself, a
    true end); ``at_grid_edge`` says the chosen value is still the grid's end, ``extended`` lists
    the candidates added.
    """
    if not pairs:
        raise ValueError(f"no validation slices to tune {name} on")
    grid = [float(c) for c in candidates]
    if grid != sorted(set(grid)):
        raise ValueError(f"{name}: the candidates must be ascending and distinct, got {list(candidates)}")
    started = time.perf_counter()
    scores: list[tuple[float, float]] = []
    extended: list[float] = []
    with progress_bar(len(grid) * len(pairs), f"tuning {name} on val", progress) as bar:
        scores = [_score_candidate(method, pairs, v, bar) for v in grid]
        while True:
            best = int(np.argmax([b for b, _ in scores]))
            upper = best == len(grid) - 1
            if not (upper or best == 0) or len(extended) >= extend_steps:
                break
            nxt = _beyond(grid, upper, lower_bound)
            if nxt is None:
                break
            bar.total += len(pairs)
            score = _score_candidate(method, pairs, nxt, bar)
            grid, scores = ([*grid, nxt], [*scores, score]) if upper else ([nxt, *grid], [score, *scores])
            extended.append(nxt)
    best = int(np.argmax([b for b, _ in scores]))
    edge = (best == len(grid) - 1) or (best == 0 and _beyond(grid, False, lower_bound) is not None)
    return {
        "candidates": grid,
        "criterion": "psnr_body",
        "val_psnr_body": [b for b, _ in scores],
        "val_psnr_window": [w for _, w in scores],
        "chosen": grid[best],
        "extended": extended,
        "at_grid_edge": bool(edge),
        "val_slices": len(pairs),
        "seconds": time.perf_counter() - started,
    }


def _haar_sigma(hu: np.ndarray) -> float:
    """Noise σ from the median absolute finest diagonal Haar coefficient inside the body (Donoho's
    MAD rule): the fallback where a slice has too little soft tissue for the main estimator."""
    x = np.asarray(hu, dtype=np.float64)
    h, w = (x.shape[0] // 2) * 2, (x.shape[1] // 2) * 2
    x = x[:h, :w]
    diag = (x[0::2, 0::2] - x[0::2, 1::2] - x[1::2, 0::2] + x[1::2, 1::2]) / 2.0
    inside = body_mask(x)
    inside = inside[0::2, 0::2] & inside[0::2, 1::2] & inside[1::2, 0::2] & inside[1::2, 1::2]
    values = diag[inside] if inside.any() else diag.ravel()
    return float(np.median(np.abs(values)) / 0.6745)


class EstimatedSigmaBM3D:
    """BM3D whose ``sigma_psd`` is each LDCT slice's own noise σ, measured on the input alone.

    :func:`ldct.data.noise.estimate_noise_sigma` (soft-tissue local-std mode) where the slice has
    enough soft tissue, else :func:`_haar_sigma`; σ rounded to 0.1 HU (the BM3D cache keys on it).
    ``last`` holds the σ and the estimator of the latest call (the table records them per slice).
    """

    def __init__(self, bm3d: Callable[[np.ndarray, float], np.ndarray]) -> None:
        self.bm3d = bm3d
        self.last: dict[str, Any] = {}

    def sigma(self, hu: np.ndarray, pixel_size_mm: float) -> tuple[float, str]:
        try:
            return estimate_noise_sigma(hu, pixel_size_mm), ESTIMATOR
        except NoiseEstimateError:
            return _haar_sigma(hu), "MAD of the finest diagonal Haar coefficients inside the body"

    def __call__(self, hu: np.ndarray, pixel_size_mm: float = 1.0) -> np.ndarray:
        sigma, how = self.sigma(hu, pixel_size_mm)
        sigma = max(0.1, round(sigma, 1))
        self.last = {"sigma_psd": sigma, "estimator": how}
        return self.bm3d(hu, sigma)


def tune_gaussian_sigma(
    slices: Iterable[Any],
    normalization: HUNormalization,
    sigmas: tuple[float, ...] = DEFAULT_SIGMAS,
    max_slices: int = 0,
) -> float:
    """The sigma from ``sigmas`` with the best mean ``psnr_body`` (soft tissue) on ``slices``
    (unit-range dataset items)."""
    pairs = hu_pairs(slices, normalization, max_slices)
    scores = []
    for sigma in sigmas:
        values = [float(psnr_body(gaussian_denoise(low, sigma), full).mean()) for low, full in pairs]
        scores.append(sum(values) / len(values))
    return float(sigmas[int(np.argmax(scores))])


def evaluate_gaussian(
    slices: Iterable[Any], sigma: float, normalization: HUNormalization, max_slices: int = 0
) -> dict[str, float]:
    """The five metrics of the Gaussian-smoothed LDCT input against full dose."""
    acc = MetricAccumulator()
    for low, full in hu_pairs(slices, normalization, max_slices):
        acc.update(gaussian_denoise(low, sigma), full)
    return acc.mean()
