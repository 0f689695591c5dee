"""The study's fast image-quality mode: task-based figures of one trial in a few seconds.

Turned on by ``study.iq = "fast"``, and whenever ``lcd_auc`` is one of ``study.objectives``. After
the trial's last training step its rank-0 worker runs the generator over fixed noise
realizations of two phantoms of :mod:`ldct.data.iq_phantoms` (192² at 1.2 mm, the profile's
dose, seed 0): every trial sees the same images, so trials differ only by their networks.

- the MITA-CCT189-like phantom (``study.iq_realizations``): the non-prewhitening observer's AUC
  per insert, and ``iq_lcd_auc``, their mean, the ``lcd_auc`` objective. NPW because it trains
  nothing: a CHO's train/test halving would add its own noise to a figure Optuna ranks trials by;
  `ldct iq phantom` gives the CHO for a chosen model.
- the water phantom (a third as many realizations, at least 10): σ and the NPS's mean frequency,
  and its shift against the full-dose images (negative = coarser, "blotchy" grain).

The LDCT input's figures come with every call (same images, no network), so each MLflow run
carries its own reference. Realizations are cached by content in ``$LDCT_HOME/iq-phantoms``;
``prepare`` makes them before the trials start, so no trial pays for the simulation.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ldct.config import HUNormalization
from ldct.data import iq_phantoms
from ldct.data.iq_phantoms import PhantomSpec
from ldct.training.engine import unwrap

FAST_SIZE_PX = 192
FAST_PIXEL_MM = 1.2
IQ_METRIC = "iq_lcd_auc"  # the lcd_auc objective
SEED = 0


def _specs() -> dict[str, PhantomSpec]:
    return {name: PhantomSpec(name, FAST_SIZE_PX, FAST_PIXEL_MM) for name in ("water", "lcd")}


def _water_count(realizations: int) -> int:
    return max(10, realizations // 3)


def phantom_images(dose: float, realizations: int) -> dict[str, np.ndarray]:
    """The fixed inputs: ``water`` and ``water_full`` (NPS), ``lcd`` (detectability), in HU."""
    specs = _specs()
    water = _water_count(realizations)
    return {
        "water": iq_phantoms.realizations(specs["water"], dose, water, seed=SEED),
        "water_full": iq_phantoms.realizations(specs["water"], 1.0, water, seed=SEED),
        "lcd": iq_phantoms.realizations(specs["lcd"], dose, realizations, seed=SEED),
    }


def prepare(dose: float, realizations: int) -> float:
    """Simulate (or find cached) the fast mode's realizations; returns the seconds it took."""
    start = time.perf_counter()
    phantom_images(dose, realizations)
    return time.perf_counter() - start


def run_generator(
    generator: torch.nn.Module,
    normalization: HUNormalization,
    device: torch.device | str,
    images: np.ndarray,
    batch: int = 8,
) -> np.ndarray:
    """HU [N, H, W] -> HU [N, H, W] through the generator, clipped to [0, 1] as in validation."""
    model = unwrap(generator)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for i in range(0, len(images), batch):
                hu = torch.from_numpy(np.ascontiguousarray(images[i : i + batch], dtype=np.float32))
                unit = normalization.to_unit(hu)[:, None].to(device)
                pred = model(unit).float().clamp(0.0, 1.0).cpu()[:, 0]
                out.append(normalization.to_hu(pred).numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out).astype(np.float32)


def _lcd(images: np.ndarray, spec: PhantomSpec, clean: np.ndarray) -> list[dict[str, Any]]:
    return iq_phantoms.lcd_rows(images, spec, clean, "npw", SEED)


def _insert_key(insert: str) -> str:
    """ "3mm/14HU" -> "iq_auc_3mm": an MLflow metric name per insert."""
    return f"iq_auc_{insert.split('/')[0]}"


def trial_iq(
    generator: torch.nn.Module,
    normalization: HUNormalization,
    device: torch.device | str,
    dose: float,
    realizations: int,
) -> dict[str, float]:
    """The trial's fast IQ figures (MLflow metric names -> values); see the module docstring."""
    start = time.perf_counter()
    images = phantom_images(dose, realizations)
    specs = _specs()
    clean = iq_phantoms.truth(specs["lcd"])
    lcd_model = _lcd(run_generator(generator, normalization, device, images["lcd"]), specs["lcd"], clean)
    lcd_input = _lcd(images["lcd"], specs["lcd"], clean)
    water = run_generator(generator, normalization, device, images["water"])
    nps_model = iq_phantoms.nps_row(water, specs["water"])
    nps_input = iq_phantoms.nps_row(images["water"], specs["water"])
    nps_full = iq_phantoms.nps_row(images["water_full"], specs["water"])
    model_auc = float(np.mean([r["auc"] for r in lcd_model]))
    input_auc = float(np.mean([r["auc"] for r in lcd_input]))
    metrics = {
        IQ_METRIC: model_auc,
        "iq_ldct_lcd_auc": input_auc,
        "iq_lcd_auc_gain": model_auc - input_auc,
        **{_insert_key(r["insert"]): float(r["auc"]) for r in lcd_model},
        "iq_sigma_hu": float(nps_model["sigma_hu"]),
        "iq_ldct_sigma_hu": float(nps_input["sigma_hu"]),
        "iq_nps_favg": float(nps_model["f_avg_per_mm"]),
        "iq_nps_favg_shift": float(nps_model["f_avg_per_mm"] - nps_full["f_avg_per_mm"]),
        "iq_ldct_nps_favg_shift": float(nps_input["f_avg_per_mm"] - nps_full["f_avg_per_mm"]),
    }
    metrics["iq_seconds"] = time.perf_counter() - start
    return metrics
