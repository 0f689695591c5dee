"""``ldct eval``: every method on one split in one table (LDCT input, Gaussian, BM3D, a model).

Each slice of the split is scored against its full-dose twin in both metric conventions of
DESIGN.md §3 (``window`` and ``full``, plus RMSE in HU), and the table gives every slice's own rows
and the mean ± std over slices. The classical baselines have their one parameter tuned on the
validation split, never on the split being scored (DESIGN.md §3, issue "science" item 4): the
Gaussian's sigma in pixels and BM3D's ``sigma_psd`` in HU, each picked from a small fixed grid by
mean window PSNR, and the table states the grid and the number of validation slices.

Images are read from the cache in HU (int16 -> float32), exactly what the metrics get; only the
model sees the normalised [0, 1] input, and its output is clipped to [0, 1] before going back to
HU, as during validation (``ldct.engine.evaluate``).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldct.config import Config, HUNormalization
from ldct.metrics import METRIC_NAMES, MetricAccumulator, all_metrics, psnr_window

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
# Pixels of the full-dose image above this HU count as "in the body" for the noise figure: the
# air around the patient is clipped by every display window and would dilute the estimate.
BODY_HU = -900.0

ROWS = ("ldct", "gaussian", "bm3d", "model")
Denoiser = Callable[[np.ndarray], np.ndarray]  # HU [H, W] float32 -> HU [H, W]


@dataclass(frozen=True)
class SlicePair:
    """One cached slice in HU (float32 [H, W]) with where it came from."""

    patient: str
    index: int
    low: np.ndarray
    full: np.ndarray


# ------------------------------------------------------------------------------------------- data


def load_slices(
    cache_dir: Path | str, patients: Sequence[str], max_slices: int = 0, crop: int = 0
) -> list[SlicePair]:
    """The patients' slice pairs in HU; ``max_slices > 0`` keeps that many spread evenly;
    ``crop > 0`` keeps each slice's central crop x crop pixels (all of a smaller slice)."""
    from ldct.data.cache import open_patient

    items = []
    for patient in patients:
        low, full = open_patient(cache_dir, patient)
        items += [(patient, s, low, full) for s in range(low.shape[0])]
    if max_slices and max_slices < len(items):
        items = [items[i] for i in np.linspace(0, len(items) - 1, max_slices).round().astype(int)]
    pairs = []
    for p, s, lo, fu in items:
        window = _centre(lo.shape[1:], crop)
        pairs.append(
            SlicePair(
                p,
                int(s),
                np.asarray(lo[s][window], dtype=np.float32),
                np.asarray(fu[s][window], dtype=np.float32),
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
    """Std of (low - full) in HU over the body (full-dose HU > BODY_HU; all pixels if none are)."""
    diff = np.asarray(low, dtype=np.float64) - np.asarray(full, dtype=np.float64)
    body = np.asarray(full) > BODY_HU
    return float(diff[body].std() if body.any() else diff.std())


def _metrics(pred_hu: np.ndarray, full_hu: np.ndarray) -> dict[str, float]:
    return {k: float(v[0]) for k, v in all_metrics(pred_hu, full_hu).items()}


# -------------------------------------------------------------------------------- classical methods


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
            from ldct.data.cache import ldct_home

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


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False)


def tune_parameter(
    method: Callable[[np.ndarray, float], np.ndarray],
    pairs: Sequence[SlicePair],
    candidates: Sequence[float],
    name: str,
    progress: bool = False,
) -> dict[str, Any]:
    """Grid search of ``method``'s one parameter by mean window PSNR over ``pairs`` (validation)."""
    if not pairs:
        raise ValueError(f"no validation slices to tune {name} on")
    started = time.perf_counter()
    scores = []
    with _progress(len(candidates) * len(pairs), f"tuning {name} on val", progress) as bar:
        for value in candidates:
            values = []
            for pair in pairs:
                values.append(float(psnr_window(method(pair.low, value), pair.full)[0]))
                bar.update(1)
            scores.append(sum(values) / len(values))
    best = int(np.argmax(scores))
    return {
        "candidates": [float(c) for c in candidates],
        "val_psnr_window": scores,
        "chosen": float(candidates[best]),
        "val_slices": len(pairs),
        "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------- models


def torch_denoiser(
    generator: torch.nn.Module, normalization: HUNormalization, device: str | torch.device = "cpu"
) -> Denoiser:
    """HU -> HU through a generator that works on [0, 1] input (clipped output, as in validation)."""
    net = getattr(generator, "module", generator).to(device).eval()

    def run(hu: np.ndarray) -> np.ndarray:
        unit = normalization.to_unit(torch.from_numpy(np.asarray(hu, dtype=np.float32)))[None, None]
        with torch.inference_mode():
            out = net(unit.to(device)).float().clamp(0.0, 1.0).cpu()[0, 0]
        return normalization.to_hu(out).numpy()

    return run


def onnx_denoiser(model_dir: Path | str) -> tuple[Denoiser, str]:
    """HU -> HU through an export directory (``ldct-best export``) on onnxruntime."""
    from ldct.deploy.export import load_exported, normalization_from_meta

    exported = load_exported(model_dir, backend="onnxruntime")
    norm = normalization_from_meta(exported.card)

    def run(hu: np.ndarray) -> np.ndarray:
        unit = norm.to_unit(np.asarray(hu, dtype=np.float32))[None, None].astype(np.float32)
        return norm.to_hu(np.clip(exported(unit)[0, 0], 0.0, 1.0)).astype(np.float32)

    version = exported.card.get("version")
    return run, f"ONNX {Path(model_dir).name}" + (f" (v{version})" if version else "")


def parse_model_uri(uri: str) -> tuple[str | None, str | None]:
    """``models:/ldct-denoiser@ALIAS`` or ``models:/ldct-denoiser/VERSION`` -> (alias, version)."""
    from ldct.tracking import MODEL_NAME

    prefix = f"models:/{MODEL_NAME}"
    if uri.startswith(prefix + "@") and len(uri) > len(prefix) + 1:
        return uri[len(prefix) + 1 :], None
    if uri.startswith(prefix + "/") and uri[len(prefix) + 1 :].isdigit():
        return None, uri[len(prefix) + 1 :]
    raise ValueError(f"model URI {uri!r}: expected {prefix}@ALIAS (e.g. @champion) or {prefix}/VERSION")


def load_denoiser(
    *,
    model: str | None = None,
    version: str | None = None,
    checkpoint: str | Path | None = None,
    onnx: str | Path | None = None,
    tracking_uri: str | None = None,
) -> tuple[Denoiser, str]:
    """The model row's denoiser and label from exactly one source (registry, checkpoint or ONNX)."""
    given = [
        n
        for n, v in (("model", model), ("version", version), ("checkpoint", checkpoint), ("onnx", onnx))
        if v
    ]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one model source (--model, --version, --checkpoint, --onnx); got {given}"
        )
    if checkpoint:
        from ldct.train import generator_from_state, load_state

        generator, cfg = generator_from_state(load_state(checkpoint))
        return torch_denoiser(generator, cfg.normalization), f"checkpoint {Path(checkpoint).name}"
    if onnx:
        return onnx_denoiser(onnx)
    from ldct.deploy.export import normalization_from_meta
    from ldct.tracking import load_registered

    alias, number = parse_model_uri(model) if model else (None, version)
    generator, meta = load_registered(alias=alias, version=number, tracking_uri=tracking_uri)
    label = f"model v{meta['version']}" + (f" @{alias}" if alias else "")
    return torch_denoiser(generator, normalization_from_meta(meta)), label


# ----------------------------------------------------------------------------------------- the table


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
) -> dict[str, Any]:
    """Score every method on ``patients``' slices; classical parameters tuned on ``val_patients``.

    Returns a JSON-able dict: ``rows`` (row keys), ``labels``, ``tuning`` (grid, chosen value,
    validation slices, seconds per method), ``slices`` (per slice: patient, index, shape,
    ``noise_std_hu`` and each row's metrics), ``mean`` and ``std`` (over slices, ddof=1; 0 for
    a single slice). ``bm3d``: True (outputs cached in ``$LDCT_HOME/bm3d``, see
    :class:`BM3DCache`), a :class:`BM3DCache`, or False (no BM3D row). ``extra``: more
    (row key, label, denoiser) rows after the model's, scored on the same slices.
    """
    if not patients:
        raise ValueError(f"split {split!r} of {cache_dir} has no patients to evaluate")
    if not val_patients:
        raise ValueError(
            f"the validation split of {cache_dir} is empty: the classical baselines are tuned on it "
            "(name validation patients with `ldct data index --val ...`)"
        )
    test = load_slices(cache_dir, patients)
    val = load_slices(cache_dir, val_patients, max_slices=tune_slices, crop=tune_crop)
    tuning: dict[str, Any] = {
        "split": "val",
        "patients": list(val_patients),
        "crop": [int(v) for v in val[0].low.shape] if val else [],
        "crop_px": int(tune_crop),
    }
    if split == "val" or set(patients) & set(val_patients):
        tuning["warning"] = "the scored split overlaps the tuning split: the classical rows are optimistic"
    tuning["gaussian"] = {
        "parameter": "sigma [px]",
        **tune_parameter(gaussian_denoise, val, gaussian_sigmas, "Gaussian sigma", progress),
    }
    methods: dict[str, Denoiser] = {
        "ldct": lambda hu: hu,
        "gaussian": lambda hu, s=tuning["gaussian"]["chosen"]: gaussian_denoise(hu, s),
    }
    labels = {"ldct": "LDCT input", "gaussian": f"Gaussian σ={tuning['gaussian']['chosen']:g}px"}
    cache = BM3DCache() if bm3d is True else bm3d if bm3d else None
    if cache is not None:
        tuning["bm3d"] = {
            "parameter": "sigma_psd [HU]",
            **tune_parameter(cache, val, bm3d_sigmas, "BM3D sigma_psd", progress),
            "cached": cache.hits,
        }
        methods["bm3d"] = lambda hu, s=tuning["bm3d"]["chosen"]: cache(hu, s)
        labels["bm3d"] = f"BM3D σ_psd={tuning['bm3d']['chosen']:g}HU"
    if denoiser is not None:
        methods["model"] = denoiser
        labels["model"] = model_label
    for key, label, run in extra:
        if key in methods:
            raise ValueError(f"row {key!r} is already in the table; give the extra model another key")
        methods[key], labels[key] = run, label

    seconds = dict.fromkeys(methods, 0.0)
    slices = []
    with _progress(len(test) * len(methods), f"scoring {split}", progress) as bar:
        for pair in test:
            row: dict[str, dict[str, float]] = {}
            for key, method in methods.items():
                tick = time.perf_counter()
                out = method(pair.low)
                seconds[key] += time.perf_counter() - tick
                row[key] = _metrics(out, pair.full)
                bar.update(1)
            slices.append(
                {
                    "patient": pair.patient,
                    "index": pair.index,
                    "shape": list(pair.low.shape),
                    "noise_std_hu": noise_std_hu(pair.low, pair.full),
                    "metrics": row,
                }
            )
    keys = list(methods)
    mean, std = {}, {}
    for key in keys:
        values = np.array([[s["metrics"][key][m] for m in METRIC_NAMES] for s in slices], dtype=np.float64)
        mean[key] = dict(zip(METRIC_NAMES, values.mean(0).tolist(), strict=True))
        spread = values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(METRIC_NAMES))
        std[key] = dict(zip(METRIC_NAMES, spread.tolist(), strict=True))
    return {
        "split": split,
        "cache": str(cache_dir),
        "patients": list(patients),
        "rows": keys,
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


def evaluate_cache(cache_dir: Path | str, split: str = "test", **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate_split` on a cache's own splits (``ldct eval --data CACHE``)."""
    from ldct.data.cache import load_manifest

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
    from ldct.train import prepare_data

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
        out[names.get(key, key)] = row
    return out


def score_test_split(
    generator: torch.nn.Module, cfg: Config, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """Mean test-split metrics: LDCT input, Gaussian and BM3D (tuned on val), denoised output."""
    return mean_rows(evaluate_generator(generator, cfg, device))


# ------------------------------------------------------------------------------------------ output


def _cell(metric: str, value: float) -> str:
    return f"{value:.2f}" if metric.startswith("psnr") or metric == "rmse_hu" else f"{value:.4f}"


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
            lines.append(
                f"{name}: {t['parameter']} tuned on the {tuning['split']} split "
                f"({_count(t['val_slices'], 'slice')}, {where}), {len(t['candidates'])} candidates "
                f"[{grid}] -> {t['chosen']:g} ({t['seconds']:.1f} s"
                + (
                    f"; {t['cached']} of {len(t['candidates']) * t['val_slices']} from the BM3D cache)"
                    if t.get("cached")
                    else ")"
                )
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
        f"(window [-160, 240] HU, range 400; full [-1024, 3072] HU, range 4096)"
    ]
    for s in table["slices"]:
        out += [
            "",
            f"{s['patient']} slice {s['index']} ({s['shape'][0]}x{s['shape'][1]}), "
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
    lines = [f"## {table['split']} split: mean ± std over {_count(n, 'slice')}", "", head, rule]
    for k in keys:
        cells = [_mean_std(m, table["mean"][k][m], table["std"][k][m], n, " ") for m in METRIC_NAMES]
        lines.append(f"| {labels[k]} | " + " | ".join(cells) + " |")
    for s in table["slices"]:
        lines += [
            "",
            f"### {s['patient']} slice {s['index']} ({s['shape'][0]}x{s['shape'][1]}, "
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
        "bm3d": "BM3D",
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
        rows.append(f"{label:<24}" + "".join(f"{row[m]:>13.4f}" for m in METRIC_NAMES))
    return "\n".join(rows)


def table_is_finite(table: dict[str, Any]) -> bool:
    """Every metric of every row of every slice is finite (PSNR of identical images is not)."""
    return all(
        math.isfinite(v) for s in table["slices"] for row in s["metrics"].values() for v in row.values()
    )


# --------------------------------------------------- the dataset-based Gaussian API (engine's, kept)


def _hu_pairs(slices: Iterable[Any], normalization: HUNormalization, max_slices: int) -> list:
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


def tune_gaussian_sigma(
    slices: Iterable[Any],
    normalization: HUNormalization,
    sigmas: tuple[float, ...] = DEFAULT_SIGMAS,
    max_slices: int = 0,
) -> float:
    """The sigma from ``sigmas`` with the best mean PSNR (window) on ``slices`` (unit-range dataset items)."""
    pairs = _hu_pairs(slices, normalization, max_slices)
    scores = []
    for sigma in sigmas:
        values = [float(psnr_window(gaussian_denoise(low, sigma), full).mean()) for low, full in pairs]
        scores.append(sum(values) / len(values))
    return float(sigmas[int(np.argmax(scores))])


def evaluate_gaussian(
    slices: Iterable[Any], sigma: float, normalization: HUNormalization, max_slices: int = 0
) -> dict[str, float]:
    """The five metrics of the Gaussian-smoothed LDCT input against full dose."""
    acc = MetricAccumulator()
    for low, full in _hu_pairs(slices, normalization, max_slices):
        acc.update(gaussian_denoise(low, sigma), full)
    return acc.mean()
