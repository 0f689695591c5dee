"""Digital phantoms for task-based image quality, through the project's own CT simulator.

Each phantom is a noise-free truth in HU; its realizations are simulated at a dose directly from
the truth (``simulate_low_dose(..., noise_free=True)``: Poisson + electronic noise in the
projections, FBP of the noise with the simulator's kernel), so every realization has the same
anatomy and independent noise, and the truth is the exact noise-free reference.

- ``water``: a 200 mm water disk in air (the NPS: noise-only images are realization − truth).
- ``rods``: the water disk with four 25 mm rods at −95, +120, +340 and +955 HU (polyethylene,
  acrylic, and two bone-like contrasts, as in the ACR CT phantom's module 1), for the TTF per
  contrast.
- ``lcd``: an MITA-CCT189-like low-contrast phantom: the 200 mm water-equivalent disk with
  inserts of 3 mm/14 HU, 5 mm/7 HU, 7 mm/5 HU and 10 mm/3 HU on a 50 mm ring; signal-absent
  ROIs come from the same ring half-way between the inserts.

Realizations are cached by content under ``$LDCT_HOME/iq-phantoms/<digest>.npz`` (the digest
covers the phantom, size, pixel, dose, count, seed and the simulator's source), loaded without
pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldct.data import simulate
from ldct.data.cache import ldct_home
from ldct.data.simulate import simulate_low_dose
from ldct.iq.nps import nps, remove_ensemble_mean
from ldct.iq.observers import detectability
from ldct.iq.ttf import ttf_from_rod

DISK_DIAMETER_MM = 200.0
RODS: tuple[tuple[float, float], ...] = ((-95.0, 12.5), (120.0, 12.5), (340.0, 12.5), (955.0, 12.5))
ROD_RING_MM = 55.0
# MITA CCT189 (the FDA LCD-CT phantom): (diameter mm, contrast HU).
LCD_INSERTS: tuple[tuple[float, float], ...] = ((3.0, 14.0), (5.0, 7.0), (7.0, 5.0), (10.0, 3.0))
LCD_RING_MM = 50.0
PHANTOMS = ("water", "rods", "lcd")
NPS_SQUARE_MM = 100.0  # the NPS tiles the water disk's central square of this side


@dataclass(frozen=True)
class PhantomSpec:
    name: str
    size: int = 256
    pixel_mm: float = 0.9

    def centre_px(self) -> float:
        return (self.size - 1) / 2.0


def _disk(
    spec: PhantomSpec, cy_mm: float, cx_mm: float, radius_mm: float, supersample: int = 4
) -> np.ndarray:
    """Area fraction of each pixel inside a disk (so edges are not staircases)."""
    n, px = spec.size, spec.pixel_mm
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    c = spec.centre_px()
    y = (np.arange(n)[:, None] + offsets[None, :]).ravel()
    yy, xx = np.meshgrid(y, y, indexing="ij")
    inside = np.hypot((yy - c) * px - cy_mm, (xx - c) * px - cx_mm) <= radius_mm
    return inside.reshape(n, supersample, n, supersample).mean(axis=(1, 3))


def ring_positions(ring_mm: float, count: int, offset_deg: float = 0.0) -> list[tuple[float, float]]:
    """(y, x) in mm from the centre, ``count`` positions evenly on a ring, starting at 12 o'clock."""
    angles = np.deg2rad(offset_deg + 360.0 * np.arange(count) / count)
    return [(-ring_mm * np.cos(a), ring_mm * np.sin(a)) for a in angles]


def truth(spec: PhantomSpec) -> np.ndarray:
    """The noise-free phantom in HU."""
    if spec.name not in PHANTOMS:
        raise ValueError(f"unknown phantom {spec.name!r}: one of {', '.join(PHANTOMS)}")
    water = _disk(spec, 0.0, 0.0, DISK_DIAMETER_MM / 2)
    image = -1000.0 + 1000.0 * water
    if spec.name == "rods":
        for (hu, radius), (y, x) in zip(RODS, ring_positions(ROD_RING_MM, len(RODS), 45.0), strict=True):
            image += hu * _disk(spec, y, x, radius)
    elif spec.name == "lcd":
        for (diameter, hu), (y, x) in zip(
            LCD_INSERTS, ring_positions(LCD_RING_MM, len(LCD_INSERTS)), strict=True
        ):
            image += hu * _disk(spec, y, x, diameter / 2)
    return image.astype(np.float32)


def _simulator_digest() -> str:
    return hashlib.sha256(Path(simulate.__file__).read_bytes()).hexdigest()[:16]


def realizations(spec: PhantomSpec, dose: float, count: int, seed: int = 0) -> np.ndarray:
    """[count, size, size] float32 HU realizations of the phantom at ``dose`` (cached)."""
    key = json.dumps(
        {**asdict(spec), "dose": dose, "count": count, "seed": seed, "simulator": _simulator_digest(),
         "inserts": [RODS, LCD_INSERTS, ROD_RING_MM, LCD_RING_MM, DISK_DIAMETER_MM]},
        sort_keys=True,
    )  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    path = ldct_home() / "iq-phantoms" / f"{spec.name}-{digest}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as data:
            return data["images"]
    clean = truth(spec)
    images = np.stack(
        [
            simulate_low_dose(
                clean, dose, np.random.default_rng([seed, i]), pixel_size_mm=spec.pixel_mm, noise_free=True
            )
            for i in range(count)
        ]
    ).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.part")
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, images=images)
    os.replace(tmp, path)
    return images


def roi(image_stack: np.ndarray, spec: PhantomSpec, y_mm: float, x_mm: float, size_px: int) -> np.ndarray:
    """[N, size, size] ROIs centred at (y, x) mm from the phantom's centre."""
    c = spec.centre_px()
    cy, cx = int(round(c + y_mm / spec.pixel_mm)), int(round(c + x_mm / spec.pixel_mm))
    h = size_px // 2
    return image_stack[..., cy - h : cy - h + size_px, cx - h : cx - h + size_px]


# The measurements that belong to where things sit in these phantoms (used by `ldct iq phantom`,
# the deployment guard and the per-trial fast mode of the study).


def roi_px(diameter_mm: float, pixel_mm: float) -> int:
    """A square ROI of about 2.5 insert diameters (odd, at least 11 px)."""
    n = max(11, int(round(2.5 * diameter_mm / pixel_mm)))
    return n + 1 - n % 2


def nps_row(outputs: np.ndarray, spec: PhantomSpec) -> dict[str, Any]:
    """The NPS summary of N outputs of the water phantom: a nonlinear method's noise is what
    varies between realizations, so the ensemble mean goes first."""
    half = int(NPS_SQUARE_MM / spec.pixel_mm / 2)
    c = int(round(spec.centre_px()))
    square = remove_ensemble_mean(outputs.astype(np.float64))[:, c - half : c + half, c - half : c + half]
    roi_size = 32 if 2 * half >= 64 else 16
    return nps(square, spec.pixel_mm, roi=roi_size, what="water phantom").summary()


def ttf_rows(outputs: np.ndarray, spec: PhantomSpec) -> list[dict[str, Any]]:
    """Per rod, the TTF of the edge of the mean of N outputs of the rod phantom."""
    mean = outputs.mean(axis=0)
    rows = []
    positions = ring_positions(ROD_RING_MM, len(RODS), 45.0)
    for (hu, radius), (y, x) in zip(RODS, positions, strict=True):
        centre = (spec.centre_px() + y / spec.pixel_mm, spec.centre_px() + x / spec.pixel_mm)
        result = ttf_from_rod(mean, centre, radius, spec.pixel_mm, span_mm=min(radius, 8.0))
        rows.append({"rod_hu": hu, **result.summary()})
    return rows


def lcd_rows(
    outputs: np.ndarray, spec: PhantomSpec, clean: np.ndarray, observer: str, seed: int
) -> list[dict[str, Any]]:
    """Per insert: signal-present ROIs at the insert, signal-absent ROIs at the four positions of
    the same ring half-way between the inserts, the noise-free insert as the template."""
    inserts = ring_positions(LCD_RING_MM, len(LCD_INSERTS))
    between = ring_positions(LCD_RING_MM, len(LCD_INSERTS), 45.0)
    rows = []
    for (diameter, hu), (y, x) in zip(LCD_INSERTS, inserts, strict=True):
        m = roi_px(diameter, spec.pixel_mm)
        present = roi(outputs, spec, y, x, m)
        absent = np.concatenate([roi(outputs, spec, by, bx, m) for by, bx in between])
        signal = roi(clean, spec, y, x, m) - 0.0  # water background is 0 HU
        result = detectability(present, absent, signal, observer=observer, channels=6, seed=seed)
        rows.append(
            {"insert": f"{diameter:g}mm/{hu:g}HU", **{k: result[k] for k in ("auc", "auc_ci", "dprime")}}
        )
    return rows
