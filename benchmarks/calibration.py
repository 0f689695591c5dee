"""Issue 22: the dose simulation before and after per-slice calibration (prints a table).

Before = the code before the change, emulated through simulate_low_dose's own arguments: the flux
I0_FULL_DOSE for every slice, skimage's Hann window reaching zero at each image's own Nyquist
(filter_name="hann"), and an electronic σ per reading that did not shrink with the view count
(electronic_noise = E * sqrt(views / 180), which the new code scales back by sqrt(180 / views)).
After = the built-in set's path: native σ estimated, i0 calibrated, the Hann window in cycles/mm.

    .venv/bin/python benchmarks/calibration.py            # real slices, water disk, NPS peaks
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from ldct.data.builtin import REAL_PATIENTS, calibrated_real_slice, real_source
from ldct.data.dicom import read_hu
from ldct.data.noise import soft_tissue_mask
from ldct.data.simulate import effective_dose, embed_in_body, simulate_low_dose, views_for

DOSE = 0.25
OLD_ELECTRONIC_NOISE = 10.0  # the constant before issue 22


def old_kwargs(n: int) -> dict:
    return {"filter_name": "hann", "electronic_noise": OLD_ELECTRONIC_NOISE * math.sqrt(views_for(n) / 180)}


def water_disk(px: float = 0.7, diameter_mm: float = 300.0) -> np.ndarray:
    size = int(math.ceil(diameter_mm / px * 1.08))
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2.0
    return np.where(np.hypot(xx, yy) * px <= diameter_mm / 2, 0.0, -1000.0).astype(np.float32)


def disk_ratio(old: bool) -> float:
    disk = water_disk()
    n = disk.shape[0]
    kw = old_kwargs(n) if old else {}
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2.0
    inner = np.hypot(xx, yy) * 0.7 <= 120.0  # 24 cm of the 30 cm disk
    sig = {}
    for d in (1.0, DOSE):
        img = simulate_low_dose(
            disk, d, np.random.default_rng(int(d * 100)), pixel_size_mm=0.7, noise_free=True, **kw
        )
        sig[d] = float((img - disk)[inner].std())
    return sig[DOSE] / sig[1.0]


def nps_peak(px: float, old: bool, diameter_mm: float = 200.0) -> float:
    """Peak (cycles/mm) of the radial NPS of dose-1 noise in the centre of a water disk: the
    differences of two pairs of realizations (the log's small deterministic bias cancels), a
    64 mm ROI, radial bins of 0.01/mm smoothed over 0.03/mm."""
    from scipy import ndimage

    disk = water_disk(px, diameter_mm)
    n = disk.shape[0]
    kw = old_kwargs(n) if old else {}
    sims = [
        simulate_low_dose(disk, 1.0, np.random.default_rng(k), pixel_size_mm=px, noise_free=True, **kw)
        for k in range(4)
    ]
    m = min(int(64 / px), int(0.6 * diameter_mm / px)) // 2 * 2
    c = n // 2
    f = np.fft.fftshift(np.fft.fftfreq(m, d=px))
    r = np.hypot(*np.meshgrid(f, f)).ravel()
    edges = np.arange(0.0, 0.5 / px, 0.01)
    idx = np.digitize(r, edges)
    total = np.zeros(len(edges) - 1)
    for a, b in ((sims[0], sims[1]), (sims[2], sims[3])):
        roi = ((a - b) / math.sqrt(2.0))[c - m // 2 : c + m // 2, c - m // 2 : c + m // 2]
        ps = (np.abs(np.fft.fftshift(np.fft.fft2(roi - roi.mean()))) ** 2).ravel()
        total += [ps[idx == i].mean() if np.any(idx == i) else 0.0 for i in range(1, len(edges))]
    smooth = ndimage.gaussian_filter1d(total, 3.0)
    i = int(np.argmax(smooth))
    return float(0.5 * (edges[i] + edges[i + 1]))


def main() -> int:
    t = time.time()
    print(
        f"water disk 30 cm, 0.7 mm, quarter/full noise sigma ratio (ideal 2.0): before {disk_ratio(True):.3f}, after {disk_ratio(False):.3f}"
    )
    for px in (0.29, 0.48, 0.7, 0.86):
        print(
            f"NPS peak at {px} mm pixels: before {nps_peak(px, True):.3f}/mm, after {nps_peak(px, False):.3f}/mm"
        )
    print(f"\nreal slices, requested dose {DOSE}")
    print(
        f"{'patient':9s} {'px mm':>6s} {'native HU':>9s} {'ref HU':>7s} {'i0':>9s} {'src dose':>7s} {'eff before':>10s} {'eff after':>9s}"
    )
    for index, patient in enumerate(sorted(REAL_PATIENTS)):
        full, meta = read_hu(real_source(patient))
        px = float(np.mean(meta["spacing"]))
        rng = np.random.default_rng([0, 0, index, 1])
        if REAL_PATIENTS[patient][1]:
            canvas, where = embed_in_body(full, px)
            old = simulate_low_dose(canvas, DOSE, rng, pixel_size_mm=px, **old_kwargs(canvas.shape[0]))[where]
        else:
            old = simulate_low_dose(full, DOSE, rng, pixel_size_mm=px, **old_kwargs(full.shape[0]))
        before = effective_dose(full, old, px, soft_tissue_mask(full, px))
        low, cal = calibrated_real_slice(patient, full, px, DOSE, seed=0, index=index)
        print(
            f"{patient:9s} {px:6.3f} {cal['native_sigma_hu']:9.2f} {cal['reference_sigma_hu']:7.2f} "
            f"{cal['i0']:9.3g} {cal['source_dose']:7.3f} {before:10.3f} {cal['effective_dose']:9.3f}"
        )
    print(f"({time.time() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
