"""The precision gate: may a faster path (bf16, int8, another runtime) replace fp32? (docs/DESIGN.md §5b)

A path is judged on the test panel of the model's own data (the test split of its profile,
at the profile's dose) against the fp32 reference, in the terms the study itself is judged by:

- mean window-convention PSNR and SSIM of the path's output (vs full dose) differ from fp32's by
  at most ``deploy.gate_psnr_db`` and ``deploy.gate_ssim``;
- the largest absolute difference from fp32's output, over every pixel, is at most
  ``deploy.gate_max_abs_hu``.

INT8 calibration data come from the *training* split (:func:`calibration_slices`), never the
panel that judges it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ldct.config import Config, DeployConfig, HUNormalization
from ldct.data.cache import ensure_data, open_patient
from ldct.metrics import psnr_window, ssim_window


@dataclass(frozen=True)
class Panel:
    """Test slices in HU (float32 [H,W] each; sizes may differ) and where they came from."""

    low_hu: list[np.ndarray]
    full_hu: list[np.ndarray]
    source: str


def _split_slices(cfg: Config, split: str, limit: int) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    cache_dir, splits = ensure_data(cfg.data)
    patients = list(splits.get(split) or [])
    if not patients:
        raise ValueError(
            f"the {split} split of {cache_dir} is empty: the gate/calibration needs {split} slices"
        )
    items = []
    for patient in patients:
        low, full = open_patient(cache_dir, patient)
        items += [(low, full, s) for s in range(low.shape[0])]
    if limit and limit < len(items):
        items = [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]
    lows = [np.asarray(lo[s], dtype=np.float32) for lo, _, s in items]
    fulls = [np.asarray(fu[s], dtype=np.float32) for _, fu, s in items]
    return lows, fulls, f"{split} split of {cache_dir} ({', '.join(patients)}; {len(items)} slices)"


def test_panel(cfg: Config) -> Panel:
    """The test split of ``cfg``'s data (``deploy.gate_max_slices`` slices, evenly spread)."""
    lows, fulls, source = _split_slices(cfg, "test", cfg.deploy.gate_max_slices)
    return Panel(lows, fulls, source)


test_panel.__test__ = False  # not a pytest test despite its name


def calibration_slices(cfg: Config) -> list[np.ndarray]:
    """INT8 calibration inputs: ``deploy.calibration_slices`` *training* slices as unit [1,1,H,W]."""
    lows, _, _ = _split_slices(cfg, "train", cfg.deploy.calibration_slices)
    return [cfg.normalization.to_unit(lo).astype(np.float32)[None, None] for lo in lows]


def run_panel(
    predict: Callable[[np.ndarray], np.ndarray], panel: Panel, norm: HUNormalization
) -> list[np.ndarray]:
    """``predict`` on each panel slice (batch 1), outputs in HU (float64 [H,W])."""
    outs = []
    for low in panel.low_hu:
        unit = norm.to_unit(low).astype(np.float32)[None, None]
        out = np.asarray(predict(unit), dtype=np.float64)
        if out.shape != unit.shape or not np.isfinite(out).all():
            raise ValueError(f"path output has shape {out.shape} (want {unit.shape}) or non-finite values")
        outs.append(norm.to_hu(out[0, 0]))
    return outs


def _window_scores(outs_hu: Sequence[np.ndarray], panel: Panel) -> dict[str, float]:
    psnr, ssim = [], []
    for out, full in zip(outs_hu, panel.full_hu, strict=True):
        pred, target = (
            torch.from_numpy(out)[None, None],
            torch.from_numpy(full.astype(np.float64))[None, None],
        )
        psnr.append(float(psnr_window(pred, target)[0]))
        ssim.append(float(ssim_window(pred, target)[0]))
    return {"psnr_window": float(np.mean(psnr)), "ssim_window": float(np.mean(ssim))}


def judge(
    candidate_hu: Sequence[np.ndarray],
    reference_hu: Sequence[np.ndarray],
    panel: Panel,
    thresholds: DeployConfig,
    reference_scores: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Gate verdict of a path's panel outputs against the fp32 reference outputs (both in HU)."""
    ref = reference_scores or _window_scores(reference_hu, panel)
    got = _window_scores(candidate_hu, panel)
    diffs = [np.abs(c - r) for c, r in zip(candidate_hu, reference_hu, strict=True)]
    max_abs = float(max(d.max() for d in diffs))
    rms = float(np.sqrt(np.mean(np.concatenate([d.ravel() ** 2 for d in diffs]))))
    d_psnr = got["psnr_window"] - ref["psnr_window"]
    d_ssim = got["ssim_window"] - ref["ssim_window"]
    failures = []
    if not abs(d_psnr) <= thresholds.gate_psnr_db:
        failures.append(f"|dPSNR| {abs(d_psnr):.4f} dB > {thresholds.gate_psnr_db:g}")
    if not abs(d_ssim) <= thresholds.gate_ssim:
        failures.append(f"|dSSIM| {abs(d_ssim):.5f} > {thresholds.gate_ssim:g}")
    if not max_abs <= thresholds.gate_max_abs_hu:
        failures.append(f"max |diff| {max_abs:.2f} HU > {thresholds.gate_max_abs_hu:g}")
    return {
        "passed": not failures,
        "failures": failures,
        "d_psnr_window_db": d_psnr,
        "d_ssim_window": d_ssim,
        "max_abs_hu": max_abs,
        "rms_hu": rms,
        "psnr_window": got["psnr_window"],
        "ssim_window": got["ssim_window"],
        "fp32_psnr_window": ref["psnr_window"],
        "fp32_ssim_window": ref["ssim_window"],
        "thresholds": {
            "psnr_db": thresholds.gate_psnr_db,
            "ssim": thresholds.gate_ssim,
            "max_abs_hu": thresholds.gate_max_abs_hu,
        },
        "panel": panel.source,
    }


def format_verdict(label: str, verdict: dict[str, Any]) -> str:
    head = "pass" if verdict["passed"] else "REFUSED (" + "; ".join(verdict["failures"]) + ")"
    return (
        f"{label}: dPSNR {verdict['d_psnr_window_db']:+.4f} dB, dSSIM {verdict['d_ssim_window']:+.5f}, "
        f"max |diff| {verdict['max_abs_hu']:.2f} HU (RMS {verdict['rms_hu']:.2f}) vs fp32: {head}"
    )
