"""The slices every table scores: cached pairs in HU, their anatomy window and noise figure.

Images are read from the cache in HU (int16 -> float32), exactly what the metrics get; only the
model sees the normalised [0, 1] input (``ldct.evaluation.denoisers``). Each slice carries its
patient's BodyPartExamined and the window its body metrics are computed in
(``ldct.metrics.resolve_window``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldct.config import HUNormalization
from ldct.data.cache import open_patient
from ldct.data.manifest import load_manifest
from ldct.metrics import SOFT_TISSUE_WINDOW, all_metrics, body_mask, resolve_window


@dataclass(frozen=True)
class SlicePair:
    """One cached slice in HU (float32 [H, W]) with where it came from."""

    patient: str
    index: int
    low: np.ndarray
    full: np.ndarray
    body_part: str = ""
    window: tuple[float, float] = SOFT_TISSUE_WINDOW  # of the body metrics
    pixel_size_mm: float = 1.0


def load_slices(
    cache_dir: Path | str, patients: Sequence[str], max_slices: int = 0, crop: int = 0, window: str = "auto"
) -> list[SlicePair]:
    """The patients' slice pairs in HU; ``max_slices > 0`` keeps that many spread evenly;
    ``crop > 0`` keeps each slice's central crop x crop pixels (all of a smaller slice);
    ``window``: "auto" (each patient's BodyPartExamined), "soft_tissue" or "brain"."""
    entries = load_manifest(cache_dir).patients
    items = []
    for patient in patients:
        low, full = open_patient(cache_dir, patient)
        items += [(patient, s, low, full) for s in range(low.shape[0])]
    if max_slices and max_slices < len(items):
        items = [items[i] for i in np.linspace(0, len(items) - 1, max_slices).round().astype(int)]
    pairs = []
    for p, s, lo, fu in items:
        crop_window = _centre(lo.shape[1:], crop)
        part = str(entries[p].get("body_part") or "")
        pairs.append(
            SlicePair(
                p,
                int(s),
                np.asarray(lo[s][crop_window], dtype=np.float32),
                np.asarray(fu[s][crop_window], dtype=np.float32),
                part,
                resolve_window(window, part),
                float(np.mean(entries[p].get("spacing") or [1.0])),
            )
        )
    return pairs


def _centre(shape: Sequence[int], crop: int) -> tuple[slice, slice]:
    if crop <= 0:
        return slice(None), slice(None)
    h, w = shape
    top, left = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
    return slice(top, top + crop), slice(left, left + crop)


def noise_std_hu(low: np.ndarray, full: np.ndarray) -> float:
    """Std of (low - full) in HU over the body (:func:`ldct.metrics.body_mask` of the full dose)."""
    diff = np.asarray(low, dtype=np.float64) - np.asarray(full, dtype=np.float64)
    return float(diff[body_mask(np.asarray(full))].std())


def slice_metrics(
    pred_hu: np.ndarray, full_hu: np.ndarray, window: tuple[float, float] | None = None
) -> dict[str, float]:
    """Every metric of one slice; ``window``: its body metrics' anatomy window (default soft tissue)."""
    return {k: float(v[0]) for k, v in all_metrics(pred_hu, full_hu, window).items()}


def hu_pairs(slices: Iterable[Any], normalization: HUNormalization, max_slices: int) -> list:
    pairs = []
    for i, item in enumerate(slices):
        if max_slices and i >= max_slices:
            break
        low = normalization.to_hu(_unit_batch(item[0]))
        full = normalization.to_hu(_unit_batch(item[1]))
        pairs.append((low, full))
    if not pairs:
        raise ValueError("no slices to evaluate the Gaussian baseline on")
    return pairs


def _unit_batch(x: Any) -> np.ndarray:
    t = torch.as_tensor(x).float()
    while t.ndim < 4:
        t = t.unsqueeze(0)
    return t.cpu().numpy()
