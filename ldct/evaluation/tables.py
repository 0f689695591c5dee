"""``ldct eval``: every method on one split in one table (LDCT input, Gaussian, BM3D, a model).

Each slice of the split is scored against its full-dose twin (docs/DESIGN.md §3): first inside
the body in the slice's anatomy window (``psnr_body``, ``ssim_body``, ``rmse_body_hu``), then the
paper's whole-slice conventions (``window``, ``full``, RMSE in HU). The table gives every slice's
own rows and the mean ± std over slices. The classical baselines come tuned on validation
(``ldct.evaluation.baselines``), beside BM3D given each slice's estimated noise; the table states
the grids, the number of validation slices and any choice left on its grid's edge.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldct.config import Config
from ldct.data.cache import load_manifest
from ldct.evaluation.baselines import (
    DEFAULT_BM3D_SIGMAS_HU,
    DEFAULT_SIGMAS,
    DEFAULT_TUNE_CROP,
    DEFAULT_TUNE_SLICES,
    BM3DCache,
    EstimatedSigmaBM3D,
    gaussian_denoise,
    progress_bar,
    tune_parameter,
)
from ldct.evaluation.denoisers import Denoiser, torch_denoiser
from ldct.evaluation.slices import SlicePair, load_slices, noise_std_hu, slice_metrics
from ldct.metrics import METRIC_NAMES
from ldct.training.loop import prepare_data

ROWS = ("ldct", "gaussian", "bm3d", "bm3d_est", "model")
EDGE_MARK = "†edge of grid"


def evaluate_split(
    cache_dir: Path | str,
    patients: Sequence[str],
    val_patients: Sequence[str],
    *,
    split: str = "test",
    denoiser: Denoiser | None = None,
    model_label: str = "model",
    bm3d: bool | BM3DCache = True,
    gaussian_sigmas: Sequence[float] = DEFAULT_SIGMAS,
    bm3d_sigmas: Sequence[float] = DEFAULT_BM3D_SIGMAS_HU,
    tune_slices: int = DEFAULT_TUNE_SLICES,
    tune_crop: int = DEFAULT_TUNE_CROP,
    progress: bool = False,
    extra: Sequence[tuple[str, str, Denoiser]] = (),
    window: str = "auto",
    bm3d_estimated: bool = True,
) -> dict[str, Any]:
    """Score every method on ``patients``' slices; classical parameters tuned on ``val_patients``.

    Returns a JSON-able dict: ``rows`` (row keys), ``labels``, ``tuning`` (grid, chosen value,
    ``at_grid_edge``, validation slices, seconds per method), ``slices`` (per slice: patient,
    index, shape, ``body_part``, ``window``, ``noise_std_hu``, the estimated BM3D σ and each
    row's metrics), ``mean`` and ``std`` (over slices, ddof=1; 0 for a single slice). ``bm3d``:
    True (outputs cached in ``$LDCT_HOME/bm3d``, see :class:`BM3DCache`), a :class:`BM3DCache`,
    or False (no BM3D rows); ``bm3d_estimated``: the "BM3D (σ estimated)" row beside the tuned
    one. ``window``: the body metrics' window ("auto" = each patient's BodyPartExamined,
    "soft_tissue", "brain"). ``extra``: more (row key, label, denoiser) rows after the model's,
    scored on the same slices.
    """
    if not patients:
        raise ValueError(f"split {split!r} of {cache_dir} has no patients to evaluate")
    if not val_patients:
        raise ValueError(
            f"the validation split of {cache_dir} is empty: the classical baselines are tuned on it "
            "(name validation patients with `ldct data index --val ...`)"
        )
    test = load_slices(cache_dir, patients, window=window)
    val = load_slices(cache_dir, val_patients, max_slices=tune_slices, crop=tune_crop, window=window)
    tuning: dict[str, Any] = {
        "split": "val",
        "window_mode": window,
        "patients": list(val_patients),
        "crop": [int(v) for v in val[0].low.shape] if val else [],
        "crop_px": int(tune_crop),
    }
    if split == "val" or set(patients) & set(val_patients):
        tuning["warning"] = "the scored split overlaps the tuning split: the classical rows are optimistic"
    cache = BM3DCache() if bm3d is True else bm3d if bm3d else None
    methods, labels = _classical_rows(val, tuning, gaussian_sigmas, cache, bm3d_sigmas, progress)
    if cache is not None and bm3d_estimated:
        methods["bm3d_est"] = EstimatedSigmaBM3D(cache)
        labels["bm3d_est"] = "BM3D (σ estimated)"
    if denoiser is not None:
        methods["model"] = denoiser
        labels["model"] = model_label
    for key, label, run in extra:
        if key in methods:
            raise ValueError(f"row {key!r} is already in the table; give the extra model another key")
        methods[key], labels[key] = run, label

    slices, seconds = _score(test, methods, split, progress)
    mean, std = _mean_and_std(slices, list(methods))
    return {
        "split": split,
        "cache": str(cache_dir),
        "patients": list(patients),
        "rows": list(methods),
        "labels": labels,
        "tuning": tuning,
        "slices": slices,
        "mean": mean,
        "std": std,
        "seconds": seconds,
        **(
            {"bm3d_cache": {"dir": str(cache.root), "hits": cache.hits, "misses": cache.misses}}
            if cache
            else {}
        ),
    }


def _classical_rows(
    val: Sequence[SlicePair],
    tuning: dict[str, Any],
    gaussian_sigmas: Sequence[float],
    cache: BM3DCache | None,
    bm3d_sigmas: Sequence[float],
    progress: bool,
) -> tuple[dict[str, Denoiser], dict[str, str]]:
    """The LDCT, Gaussian and BM3D rows, their parameters tuned on ``val`` (recorded in ``tuning``)."""
    tuning["gaussian"] = {
        "parameter": "sigma [px]",
        **tune_parameter(gaussian_denoise, val, gaussian_sigmas, "Gaussian sigma", progress),
    }
    methods: dict[str, Denoiser] = {
        "ldct": lambda hu: hu,
        "gaussian": lambda hu, s=tuning["gaussian"]["chosen"]: gaussian_denoise(hu, s),
    }
    labels = {"ldct": "LDCT input", "gaussian": f"Gaussian σ={tuning['gaussian']['chosen']:g}px"}
    if cache is not None:
        tuning["bm3d"] = {
            "parameter": "sigma_psd [HU]",
            **tune_parameter(cache, val, bm3d_sigmas, "BM3D sigma_psd", progress),
            "cached": cache.hits,
        }
        methods["bm3d"] = lambda hu, s=tuning["bm3d"]["chosen"]: cache(hu, s)
        labels["bm3d"] = f"BM3D (σ tuned) σ_psd={tuning['bm3d']['chosen']:g}HU"
    for key in ("gaussian", "bm3d"):
        if key in labels and tuning[key]["at_grid_edge"]:
            labels[key] += f" {EDGE_MARK}"
    return methods, labels


def _score(
    test: Sequence[SlicePair], methods: dict[str, Denoiser], split: str, progress: bool
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Every method on every slice: per-slice rows (with the slice's noise figure) and seconds per method."""
    seconds = dict.fromkeys(methods, 0.0)
    slices = []
    with progress_bar(len(test) * len(methods), f"scoring {split}", progress) as bar:
        for pair in test:
            row: dict[str, dict[str, float]] = {}
            record: dict[str, Any] = {}
            for key, method in methods.items():
                tick = time.perf_counter()
                if isinstance(method, EstimatedSigmaBM3D):
                    out = method(pair.low, pair.pixel_size_mm)
                    record["bm3d_estimated"] = dict(method.last)
                else:
                    out = method(pair.low)
                seconds[key] += time.perf_counter() - tick
                row[key] = slice_metrics(out, pair.full, pair.window)
                bar.update(1)
            slices.append(
                {
                    "patient": pair.patient,
                    "index": pair.index,
                    "shape": list(pair.low.shape),
                    "body_part": pair.body_part,
                    "window": list(pair.window),
                    "noise_std_hu": noise_std_hu(pair.low, pair.full),
                    **record,
                    "metrics": row,
                }
            )
    return slices, seconds


def _mean_and_std(
    slices: list[dict[str, Any]], keys: list[str]
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Mean and sample std (ddof=1; 0 for a single slice) of every metric of every row."""
    mean, std = {}, {}
    for key in keys:
        values = np.array([[s["metrics"][key][m] for m in METRIC_NAMES] for s in slices], dtype=np.float64)
        mean[key] = dict(zip(METRIC_NAMES, values.mean(0).tolist(), strict=True))
        spread = values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(METRIC_NAMES))
        std[key] = dict(zip(METRIC_NAMES, spread.tolist(), strict=True))
    return mean, std


def evaluate_cache(cache_dir: Path | str, split: str = "test", **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate_split` on a cache's own splits (``ldct eval --data CACHE``)."""
    manifest = load_manifest(cache_dir)
    if split not in manifest.splits:
        raise ValueError(f"unknown split {split!r}; the cache {cache_dir} has {sorted(manifest.splits)}")
    return evaluate_split(
        cache_dir, manifest.splits[split], manifest.splits.get("val", []), split=split, **kwargs
    )


def evaluate_generator(
    generator: torch.nn.Module,
    cfg: Config,
    device: str = "cpu",
    label: str = "denoised (ldct)",
    progress: bool = False,
    extra: Sequence[tuple[str, str, Denoiser]] = (),
) -> dict[str, Any]:
    """The full test-split table of a generator on ``cfg``'s data (its splits and normalisation),
    with ``extra`` (row key, label, denoiser) rows beside it."""
    cache_dir, splits = prepare_data(cfg)
    return evaluate_split(
        cache_dir,
        splits.get("test", []),
        splits.get("val", []),
        denoiser=torch_denoiser(generator, cfg.normalization, device),
        model_label=label,
        tune_slices=cfg.data.max_val_slices or DEFAULT_TUNE_SLICES,
        tune_crop=cfg.data.tune_crop,
        progress=progress,
        extra=extra,
        window=cfg.data.window,
    )


def mean_rows(table: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The legacy shape of ``score_test_split``: ldct / classical (+sigma) / bm3d (+sigma_psd) / denoised."""
    names = {"ldct": "ldct", "gaussian": "classical", "bm3d": "bm3d", "model": "denoised"}
    out: dict[str, dict[str, float]] = {}
    for key in table["rows"]:
        row = dict(table["mean"][key])
        if key == "gaussian":
            row["sigma"] = table["tuning"]["gaussian"]["chosen"]
        if key == "bm3d":
            row["sigma_psd"] = table["tuning"]["bm3d"]["chosen"]
        if key in ("gaussian", "bm3d"):
            row["at_grid_edge"] = float(table["tuning"][key]["at_grid_edge"])
        out[names.get(key, key)] = row
    return out


def score_test_split(
    generator: torch.nn.Module, cfg: Config, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """Mean test-split metrics: LDCT input, Gaussian and BM3D (tuned on val), denoised output."""
    return mean_rows(evaluate_generator(generator, cfg, device))


def _cell(metric: str, value: float) -> str:
    return f"{value:.4f}" if metric.startswith("ssim") else f"{value:.2f}"


METRICS_NOTE = (
    "*_body: inside the body (reference > -500 HU, holes filled, eroded 2 px) in each slice's "
    "anatomy window, range = its width; *_window: whole slice in [-160, 240] HU, range 400; "
    "*_full: whole slice in [-1024, 3072] HU, range 4096"
)


def _where(s: dict[str, Any]) -> str:
    """A slice's body part and the window of its body metrics, e.g. "HEAD, window [0, 80] HU"."""
    lo, hi = s.get("window") or (-160.0, 240.0)
    return f"{s.get('body_part') or 'body part n/a'}, window [{lo:g}, {hi:g}] HU"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _mean_std(metric: str, mean: float, std: float, n: int, pad: str = "") -> str:
    # One slice has no spread: show its value alone rather than a misleading "± 0".
    if n < 2:
        return _cell(metric, mean)
    return f"{_cell(metric, mean)}{pad}±{pad}{_cell(metric, std)}"


def budget_lines(table: dict[str, Any]) -> list[str]:
    """The tuning budget of the classical rows, in words (the reports state it)."""
    tuning = table["tuning"]
    lines = []
    for key, name in (("gaussian", "Gaussian"), ("bm3d", "BM3D")):
        if key in tuning:
            t = tuning[key]
            grid = ", ".join(f"{c:g}" for c in t["candidates"])
            crop = tuning.get("crop_px") or 0
            where = f"central {crop}x{crop} px" if crop else "whole slices"
            extended = t.get("extended") or []
            lines.append(
                f"{name}: {t['parameter']} tuned on the {tuning['split']} split by mean "
                f"{t.get('criterion', 'psnr_window')} "
                f"({_count(t['val_slices'], 'slice')}, {where}), {len(t['candidates'])} candidates "
                f"[{grid}] -> {t['chosen']:g} ({t['seconds']:.1f} s"
                + (
                    f"; {t['cached']} of {len(t['candidates']) * t['val_slices']} from the BM3D cache)"
                    if t.get("cached")
                    else ")"
                )
                + (f"; grid extended by [{', '.join(f'{c:g}' for c in extended)}]" if extended else "")
                + (f"; {EDGE_MARK}: the best value is the grid's end" if t.get("at_grid_edge") else "")
            )
    if "bm3d_est" in table.get("rows", []):
        sigmas = [s["bm3d_estimated"]["sigma_psd"] for s in table["slices"] if "bm3d_estimated" in s]
        how = {s["bm3d_estimated"]["estimator"] for s in table["slices"] if "bm3d_estimated" in s}
        if sigmas:
            lines.append(
                f"BM3D (σ estimated): sigma_psd = each LDCT slice's own noise σ, "
                f"{min(sigmas):g}-{max(sigmas):g} HU, no tuning ({'; '.join(sorted(how))})"
            )
    if "warning" in tuning:
        lines.append(f"warning: {tuning['warning']}")
    return lines


def format_eval(table: dict[str, Any]) -> str:
    """Text: one table per slice, then mean ± std over slices; rows = methods."""
    keys = table["rows"]
    labels = table["labels"]
    width = max(22, *(len(labels[k]) + 2 for k in keys))
    head = f"{'':<{width}}" + "".join(f"{m:>13}" for m in METRIC_NAMES)
    out = [
        f"split {table['split']!r} of {table['cache']}: {_count(len(table['slices']), 'slice')} "
        f"({METRICS_NOTE})"
    ]
    for s in table["slices"]:
        out += [
            "",
            f"{s['patient']} slice {s['index']} ({s['shape'][0]}x{s['shape'][1]}, {_where(s)}), "
            f"noise std {s['noise_std_hu']:.1f} HU",
            head,
        ]
        out += [
            f"{labels[k]:<{width}}" + "".join(f"{_cell(m, s['metrics'][k][m]):>13}" for m in METRIC_NAMES)
            for k in keys
        ]
    n = len(table["slices"])
    out += [
        "",
        f"mean ± std over {_count(n, 'slice')}",
        f"{'':<{width}}" + "".join(f"{m:>17}" for m in METRIC_NAMES),
    ]
    for k in keys:
        cells = [_mean_std(m, table["mean"][k][m], table["std"][k][m], n) for m in METRIC_NAMES]
        out.append(f"{labels[k]:<{width}}" + "".join(f"{c:>17}" for c in cells))
    out += [""] + budget_lines(table)
    return "\n".join(out)


def markdown_eval(table: dict[str, Any], model_label: str | None = None) -> str:
    """Markdown of :func:`format_eval`: mean ± std first, then per-slice tables and the budget."""
    keys = table["rows"]
    labels = dict(table["labels"])
    if model_label and "model" in labels:
        labels["model"] = model_label
    head = "| " + " | ".join(["method", *METRIC_NAMES]) + " |"
    rule = "|---" * (len(METRIC_NAMES) + 1) + "|"
    n = len(table["slices"])
    lines = [
        f"## {table['split']} split: mean ± std over {_count(n, 'slice')}",
        "",
        METRICS_NOTE,
        "",
        head,
        rule,
    ]
    for k in keys:
        cells = [_mean_std(m, table["mean"][k][m], table["std"][k][m], n, " ") for m in METRIC_NAMES]
        lines.append(f"| {labels[k]} | " + " | ".join(cells) + " |")
    for s in table["slices"]:
        lines += [
            "",
            f"### {s['patient']} slice {s['index']} ({s['shape'][0]}x{s['shape'][1]}, {_where(s)}, "
            f"noise std {s['noise_std_hu']:.1f} HU)",
            "",
            head,
            rule,
        ]
        lines += [
            f"| {labels[k]} | " + " | ".join(_cell(m, s["metrics"][k][m]) for m in METRIC_NAMES) + " |"
            for k in keys
        ]
    lines += ["", "Tuning budgets (classical methods: on the validation split only):", ""]
    lines += [f"- {line}" for line in budget_lines(table)]
    return "\n".join(lines) + "\n"


def format_table(table: dict[str, dict[str, float]]) -> str:
    """Text table of :func:`score_test_split`'s mean rows (LDCT / Gaussian / BM3D / denoised)."""
    header = f"{'':<24}" + "".join(f"{m:>13}" for m in METRIC_NAMES)
    rows = [header]
    labels = {
        "ldct": "LDCT input",
        "classical": "Gaussian filter",
        "bm3d": "BM3D (σ tuned)",
        "bm3d_est": "BM3D (σ estimated)",
        "denoised": "denoised (ldct)",
    }
    for key, label in labels.items():
        if key not in table:
            continue
        row = table[key]
        if key == "classical" and "sigma" in row:
            label = f"Gaussian σ={row['sigma']:.2f}px"
        if key == "bm3d" and "sigma_psd" in row:
            label = f"BM3D σ_psd={row['sigma_psd']:g}HU"
        if row.get("at_grid_edge"):
            label += " †"
        rows.append(f"{label:<24}" + "".join(f"{row[m]:>13.4f}" for m in METRIC_NAMES))
    return "\n".join(rows)


def table_is_finite(table: dict[str, Any]) -> bool:
    """Every metric of every row of every slice is finite (PSNR of identical images is not)."""
    return all(
        math.isfinite(v) for s in table["slices"] for row in s["metrics"].values() for v in row.values()
    )
