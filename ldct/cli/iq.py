"""``ldct iq``: task-based image quality: NPS of noise-only images, model-observer detectability."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ldct.data.dicom import DicomError, read_hu
from ldct.evaluation.iq import markdown, phantom_table
from ldct.iq.nps import IQError, nps, remove_ensemble_mean
from ldct.iq.observers import detectability
from ldct.plots import iq_figure
from ldct.registry.load import load_denoiser


def load_npy(path: str, what: str) -> np.ndarray:
    """A numeric .npy array, never a pickle; IQError naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise IQError(f"{what} {path}: no such file")
    try:
        array = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise IQError(f"{what} {path}: not a numeric .npy array ({exc}); save it with numpy.save") from exc
    if not np.issubdtype(array.dtype, np.number):
        raise IQError(f"{what} {path}: dtype {array.dtype} is not numeric")
    return array


def _dicom_noise(paths: list[str]) -> tuple[np.ndarray, tuple[float, float], bool]:
    """Noise-only images from DICOM slices: repeated scans of one position lose their mean."""
    files = [
        f
        for p in paths
        for f in (sorted(q for q in Path(p).rglob("*") if q.is_file()) if Path(p).is_dir() else [Path(p)])
    ]
    by_position: dict[float, list[np.ndarray]] = {}
    spacing: tuple[float, float] | None = None
    for f in files:
        try:
            hu, meta = read_hu(f)
        except DicomError as exc:
            raise IQError(f"{f}: {exc}") from exc
        if not meta.get("spacing"):
            raise IQError(
                f"{f}: no PixelSpacing; the NPS needs the pixel size (or give .npy with --pixel-mm)"
            )
        if spacing is not None and tuple(meta["spacing"]) != spacing:
            raise IQError(f"{f}: pixel spacing {meta['spacing']} differs from the others' {spacing}")
        spacing = tuple(meta["spacing"])
        z = round(float(meta["z"]), 2) if meta.get("z") is not None else float(len(by_position))
        by_position.setdefault(z, []).append(hu)
    if spacing is None:
        raise IQError(f"no DICOM slice under {', '.join(paths)}")
    shapes = {img.shape for group in by_position.values() for img in group}
    if len(shapes) > 1:
        raise IQError(f"slices of different sizes {sorted(shapes)}: give one series")
    ensemble = all(len(g) >= 2 for g in by_position.values())
    noise = []
    for group in by_position.values():
        stack = np.stack(group).astype(np.float64)
        noise.extend(remove_ensemble_mean(stack) if ensemble else stack)
    return np.stack(noise), spacing, ensemble


def _central(stack: np.ndarray, fraction: float) -> np.ndarray:
    if not 0 < fraction <= 1:
        raise IQError(f"--crop must be in (0, 1], got {fraction}")
    h, w = stack.shape[1:]
    ch, cw = max(8, int(round(h * fraction))), max(8, int(round(w * fraction)))
    return stack[:, (h - ch) // 2 : (h - ch) // 2 + ch, (w - cw) // 2 : (w - cw) // 2 + cw]


def cmd_nps(args: argparse.Namespace) -> int:
    try:
        if len(args.paths) == 1 and args.paths[0].endswith(".npy"):
            if args.pixel_mm is None:
                raise IQError(f"{args.paths[0]}: a .npy stack has no pixel size; give --pixel-mm")
            stack = load_npy(args.paths[0], "noise stack")
            pixel, ensemble, crop = (args.pixel_mm, args.pixel_mm), False, args.crop or 1.0
        else:
            stack, pixel, ensemble = _dicom_noise(args.paths)
            crop = args.crop or 0.5
        result = nps(
            _central(stack, crop), pixel, roi=args.roi, detrend=args.detrend, what=", ".join(args.paths)
        )
    except IQError as exc:
        print(f"ldct iq nps: {exc}", file=sys.stderr)
        return 2
    out = {**result.summary(), "pixel_mm": list(pixel), "ensemble_mean_removed": ensemble, "roi_px": args.roi}
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"NPS of {len(stack)} image(s), {result.n_rois} ROIs of {args.roi} px: sigma {out['sigma_hu']:.2f} HU, "
            f"peak {out['f_peak_per_mm']:.3f} /mm, mean frequency {out['f_avg_per_mm']:.3f} /mm"
        )
    return 0


def cmd_lcd(args: argparse.Namespace) -> int:
    try:
        present = load_npy(args.present, "signal-present ROIs")
        absent = load_npy(args.absent, "signal-absent ROIs")
        signal = load_npy(args.signal, "signal template")
        result = detectability(
            present, absent, signal, observer=args.observer, channels=args.channels,
            width_px=args.channel_width_px, splits=args.splits, seed=args.seed,
            names=(args.present, args.absent, args.signal),
        )  # fmt: skip
    except IQError as exc:
        print(f"ldct iq lcd: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        lo, hi = result["auc_ci"]
        print(
            f"{args.observer.upper()}: AUC {result['auc']:.3f} [{lo:.3f}, {hi:.3f}], d' {result['dprime']:.2f}"
        )
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    denoiser, label = None, "model"
    if args.model or args.checkpoint or args.onnx:
        denoiser, label = load_denoiser(
            model=args.model, checkpoint=args.checkpoint, onnx=args.onnx, tracking_uri=args.tracking_uri
        )
    table = phantom_table(
        denoiser, label, dose=args.dose, quick=args.quick, observer=args.observer,
        gaussian_sigma_mm=args.gaussian_sigma_mm, seed=args.seed, bm3d=not args.no_bm3d,
        progress=lambda m: print(f"[ldct iq] {m}", file=sys.stderr, flush=True),
    )  # fmt: skip
    report = markdown(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "iq.json").write_text(json.dumps(table, indent=1))
        (out / "iq.md").write_text("# Image quality on digital phantoms (`ldct iq phantom`)\n\n" + report)
        iq_figure(table, out / "iq.png")
        print(f"[ldct iq] written: {out}/iq.md, iq.json, iq.png", file=sys.stderr)
    print(json.dumps(table) if args.json else report)
    return 0
