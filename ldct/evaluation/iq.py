"""`ldct iq phantom`: NPS, TTF and low-contrast detectability of every method on digital phantoms.

Rows: the full-dose images, the LDCT input (the profile's dose), a Gaussian filter, BM3D with σ
estimated from each input image, and the model. Every method sees the same realizations of the
three phantoms of :mod:`ldct.data.iq_phantoms`:

- NPS: each method's N outputs of the water phantom lose their ensemble mean (a nonlinear
  method's noise is what varies between realizations), then ROIs tile the central 100 mm square;
- TTF: per rod, the edge of the mean of the method's N outputs of the rod phantom;
- LCD: per insert, signal-present ROIs at the insert, signal-absent ROIs at the four positions of
  the same ring half-way between the inserts, the noise-free insert as the template, the
  channelized Hotelling observer (NPW with ``observer="npw"``).

No parameter is chosen on these phantoms: the Gaussian's σ is given (``gaussian_sigma_mm``),
BM3D's σ is measured on each input image, the model is what it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ldct.data import iq_phantoms
from ldct.data.iq_phantoms import PhantomSpec
from ldct.evaluation.baselines import EstimatedSigmaBM3D, bm3d_denoise, gaussian_denoise

Denoiser = Callable[[np.ndarray], np.ndarray]

# (size px, pixel mm, realizations per phantom and dose)
PROFILES = {"quick": (192, 1.2, 20), "full": (384, 0.6, 60)}


def _apply(denoise: Denoiser | None, images: np.ndarray) -> np.ndarray:
    if denoise is None:
        return images
    return np.stack([np.asarray(denoise(img), dtype=np.float32) for img in images])


def phantom_table(
    model: Denoiser | None,
    model_label: str = "model",
    dose: float = 0.25,
    quick: bool = True,
    observer: str = "cho",
    gaussian_sigma_mm: float = 1.0,
    seed: int = 0,
    progress: Callable[[str], None] = lambda m: None,
    bm3d: bool = True,
    geometry: tuple[int, float, int] | None = None,
) -> dict[str, Any]:
    """``{"rows": {method: {"nps": {...}, "ttf": [...], "lcd": [...]}}, "setup": {...}}``.

    ``geometry`` = (size px, pixel mm, realizations) overrides the quick/full profile."""
    size, px, n = geometry or PROFILES["quick" if quick else "full"]
    start = time.perf_counter()
    specs = {name: PhantomSpec(name, size, px) for name in iq_phantoms.PHANTOMS}
    images = {
        (name, d): iq_phantoms.realizations(spec, d, n, seed=seed)
        for name, spec in specs.items()
        for d in (dose, 1.0)
    }
    progress(f"phantoms ready ({n} realizations each, {time.perf_counter() - start:.1f} s)")
    estimated_bm3d = EstimatedSigmaBM3D(bm3d_denoise)
    methods: dict[str, tuple[float, Denoiser | None]] = {
        "full dose": (1.0, None),
        "LDCT": (dose, None),
        f"Gaussian σ {gaussian_sigma_mm:g} mm": (
            dose,
            lambda hu: gaussian_denoise(hu, gaussian_sigma_mm / px),
        ),
    }
    if bm3d:
        methods["BM3D (σ estimated)"] = (dose, lambda hu: estimated_bm3d(hu, px))
    if model is not None:
        methods[model_label] = (dose, model)
    lcd_truth = iq_phantoms.truth(specs["lcd"])
    rows: dict[str, Any] = {}
    for method, (d, denoise) in methods.items():
        tick = time.perf_counter()
        out = {name: _apply(denoise, images[(name, d)]) for name in specs}
        rows[method] = {
            "nps": iq_phantoms.nps_row(out["water"], specs["water"]),
            "ttf": iq_phantoms.ttf_rows(out["rods"], specs["rods"]),
            "lcd": iq_phantoms.lcd_rows(out["lcd"], specs["lcd"], lcd_truth, observer, seed),
        }
        progress(f"{method}: {time.perf_counter() - tick:.1f} s")
    return {
        "rows": rows,
        "setup": {
            "dose": dose, "size_px": size, "pixel_mm": px, "realizations": n, "observer": observer,
            "seconds": round(time.perf_counter() - start, 1), "seed": seed,
        },
    }  # fmt: skip


def markdown(table: dict[str, Any]) -> str:
    """The report: one line per method for NPS and mean LCD AUC, then TTF and AUC per insert."""
    setup = table["setup"]
    rows = table["rows"]
    inserts = [r["insert"] for r in next(iter(rows.values()))["lcd"]]
    rods = [r["rod_hu"] for r in next(iter(rows.values()))["ttf"]]
    lines = [
        f"Phantoms {setup['size_px']}² at {setup['pixel_mm']} mm, {setup['realizations']} realizations, "
        f"dose {setup['dose']:g}, observer {setup['observer'].upper()} ({setup['seconds']} s).",
        "σ and NPS: the water phantom's central 100 mm; TTF f50 in mm⁻¹ per rod contrast ('> N': "
        "above 0.5 up to the Nyquist frequency N; the simulator inserts noise but does not blur the "
        "anatomy, so a method's TTF is its own blur); AUC per MITA-CCT189 insert, 95 % bootstrap interval.",
        "",
        "| method | σ HU | NPS f_peak /mm | NPS f_avg /mm | "
        + " | ".join(f"TTF f50 {h:+g} HU" for h in rods)
        + " | "
        + " | ".join(f"AUC {i}" for i in inserts)
        + " |",
        "|---" * (4 + len(rods) + len(inserts)) + "|",
    ]
    for method, row in rows.items():
        n = row["nps"]
        ttf = " | ".join(
            f"{r['f50_per_mm']:.3f}" if r["f50_per_mm"] is not None else f"> {r['nyquist_per_mm']:.2f}"
            for r in row["ttf"]
        )
        lcd = " | ".join(f"{r['auc']:.3f} [{r['auc_ci'][0]:.2f}, {r['auc_ci'][1]:.2f}]" for r in row["lcd"])
        lines.append(
            f"| {method} | {n['sigma_hu']:.2f} | {n['f_peak_per_mm']:.3f} | {n['f_avg_per_mm']:.3f} | {ttf} | {lcd} |"
        )
    return "\n".join(lines) + "\n"


def lcd_guard(
    model: Denoiser,
    dose: float = 0.25,
    mode: str = "full",
    seed: int = 0,
    geometry: tuple[int, float, int] | None = None,
) -> dict[str, Any]:
    """Does the model make any low-contrast insert harder to detect than its LDCT input?

    NPW observer (nothing trained, so no training noise in the verdict) on the CCT189-like
    phantom, model and LDCT on the same realizations. An insert fails when the model's whole 95 %
    AUC interval lies below the LDCT input's AUC: worse beyond what the realizations can tell
    apart, not merely a lower point estimate. ``mode`` "quick" (192² at 1.2 mm, 20 realizations)
    or "full" (384² at 0.6 mm, 60).
    """
    size, px, n = geometry or PROFILES["quick" if mode == "quick" else "full"]
    spec = PhantomSpec("lcd", size, px)
    low = iq_phantoms.realizations(spec, dose, n, seed=seed)
    clean = iq_phantoms.truth(spec)
    rows = {
        "LDCT": iq_phantoms.lcd_rows(low, spec, clean, "npw", seed),
        "model": iq_phantoms.lcd_rows(_apply(model, low), spec, clean, "npw", seed),
    }
    failed = [
        m["insert"] for m, ref in zip(rows["model"], rows["LDCT"], strict=True) if m["auc_ci"][1] < ref["auc"]
    ]
    return {"passed": not failed, "failed_inserts": failed, "rows": rows,
            "setup": {"dose": dose, "size_px": size, "pixel_mm": px, "realizations": n, "observer": "npw"}}  # fmt: skip


def guard_message(verdict: dict[str, Any]) -> str:
    pairs = ", ".join(
        f"{m['insert']} {m['auc']:.3f} [{m['auc_ci'][0]:.2f}, {m['auc_ci'][1]:.2f}] vs LDCT {ref['auc']:.3f}"
        for m, ref in zip(verdict["rows"]["model"], verdict["rows"]["LDCT"], strict=True)
    )
    head = "passed" if verdict["passed"] else f"REFUSED on {', '.join(verdict['failed_inserts'])}"
    return f"image-quality guard (NPW AUC per insert, model vs LDCT input): {head}: {pairs}"
