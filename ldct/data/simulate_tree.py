"""``ldct data simulate``: routine-dose CT -> Mayo-layout full/quarter pairs (docs/DESIGN.md §3).

Each source slice is the full dose, HU exactly; its quarter dose is the dose-corrected noise
insertion of :mod:`ldct.data.simulate` at a flux calibrated to the slice's own noise
(:func:`ldct.data.simulate.insert_calibrated`), so ``--dose d`` is the effective dose d. A slice
whose noise cannot be measured (too little soft tissue: the top of a skull, a lung apex) takes the
median flux of its series' measurable slices; a series with none is an error, unless ``--i0``
sets one flux for every slice (the old behaviour, no calibration). A source already noisier than
the dose allows is an error naming it (:class:`ldct.data.simulate.SourceTooNoisy`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import generate_uid

import ldct
from ldct.data.dicom import DicomError, FrameGeometry, _dcmread, read_frames
from ldct.data.noise import ESTIMATOR, NoiseEstimateError
from ldct.data.simulate import (
    ELECTRONIC_NOISE,
    INSERTION_METHOD,
    SourceTooNoisy,
    effective_dose,
    insert_calibrated,
    simulate_low_dose,
)
from ldct.data.sources import Source, find_sources
from ldct.data.writer import ct_slice, derived_series_number, hu_to_stored, mark_derived, output_syntax, save

SIDECAR = "ldct-simulate.json"


@dataclass(frozen=True)
class _Run:
    """The settings of one :func:`simulate_tree` run."""

    src: Path
    tmp: Path  # the output tree while it is written
    dose: float
    seed: int
    i0: float | None  # None: calibrated per slice
    electronic_noise: float
    skip_bad: bool
    keep_transfer_syntax: bool

    def uid(self, *parts: Any) -> str:
        # Same seed and source -> same UID; never one of the input's UIDs.
        return generate_uid(
            entropy_srcs=["ldct-simulate", str(self.seed), f"{self.dose:g}", *map(str, parts)]
        )


@dataclass(frozen=True)
class _Series:
    """The new identity of one output series pair."""

    key: str  # patient directory
    thickness: str  # "<t>mm"
    study_uid: str
    frame_uid: str
    series_uid: dict[str, str]  # "full" | "quarter" -> SeriesInstanceUID


def simulate_tree(
    in_dir: Path | str,
    out_dir: Path | str,
    dose: float = 0.25,
    seed: int = 0,
    i0: float | None = None,
    electronic_noise: float = ELECTRONIC_NOISE,
    skip_bad: bool = False,
    keep_transfer_syntax: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """``ldct data simulate``: routine-dose CT under ``in_dir`` -> Mayo-layout pairs in ``out_dir``.

    ``in_dir``: a Mayo or TCIA tree (its full-dose series are used) or any folder of CT slices
    (single-frame or Enhanced CT, compressed or not). Each series becomes
    ``OUT/<PatientID>[-S<SeriesNumber>]/{full,quarter}_<thickness>mm/<n>.IMA``: full = the input
    HU exactly, quarter = the dose-corrected noise insertion at effective dose ``dose`` with the
    slice's own pixel spacing and a flux calibrated to its native noise (``i0`` set: that flux for
    every slice, uncalibrated). Every output UID is new (deterministic per seed); provenance goes into the
    quarter files' DerivationDescription and ``OUT/ldct-simulate.json``. Nothing under
    ``in_dir`` is written; ``out_dir`` must be missing or empty and is filled atomically.
    Returns the sidecar's content.
    """
    from tqdm import tqdm

    src, dst = Path(in_dir), Path(out_dir)
    _check_arguments(src, dst, dose, i0, electronic_noise)
    sources, skipped, notes = find_sources(src, skip_bad)
    provenance = {
        "tool": "ldct data simulate",
        "tool_version": ldct.__version__,
        "dose": float(dose),
        "i0": None if i0 is None else float(i0),
        "calibration": "per slice, to its native noise" if i0 is None else "none: fixed i0",
        "estimator": ESTIMATOR,
        "electronic_noise": float(electronic_noise),
        "seed": int(seed),
        "method": INSERTION_METHOD,
    }
    files: list[dict[str, Any]] = []
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    run = _Run(src, tmp, dose, seed, i0, electronic_noise, skip_bad, keep_transfer_syntax)
    try:
        by_series: dict[tuple[str, str], list[Source]] = {}
        for s_ in sources:
            by_series.setdefault((s_.key, s_.thickness), []).append(s_)
        bar = tqdm(total=len(sources), desc="simulate", unit="slice", disable=not progress)
        for (key, thickness), members in sorted(by_series.items()):
            _simulate_series(run, key, thickness, members, files, skipped, notes, bar)
        bar.close()
        if not files:
            raise DicomError(
                f"{src}: no slice could be simulated; first problem: {skipped[0][1] if skipped else '-'}"
            )
        sidecar = {
            **provenance,
            "input": str(src.resolve()),
            "files": files,
            "skipped": skipped,
            "notes": notes,
        }
        (tmp / SIDECAR).write_text(
            json.dumps({k: v for k, v in sidecar.items() if k != "input"}, indent=1, sort_keys=True) + "\n"
        )
        if dst.exists():
            dst.rmdir()
        os.rename(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return sidecar


def _check_arguments(src: Path, dst: Path, dose: float, i0: float | None, electronic_noise: float) -> None:
    if not 0 < dose < 1:
        raise ValueError(f"--dose must be a fraction of the full dose in (0, 1), got {dose}")
    if (i0 is not None and not i0 > 0) or electronic_noise < 0:
        raise ValueError(f"--i0 must be > 0 and --electronic-noise >= 0, got {i0} and {electronic_noise}")
    if not src.is_dir():
        raise DicomError(f"{src}: no such input directory; give a folder of routine-dose CT slices")
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise ValueError(
            f"output {dst} and input {src} overlap; choose an output outside the input (it is never written)"
        )
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty; give a new or empty output directory")


def _simulate_series(
    run: _Run,
    key: str,
    thickness: str,
    members: list[Source],
    files: list[dict[str, Any]],
    skipped: list[tuple[str, str]],
    notes: list[tuple[str, str]],
    bar: Any,
) -> None:
    """Simulate and write one output series pair; its slices are numbered along the slice normal.
    Slices whose noise cannot be measured wait for the series' median calibrated flux."""
    members.sort(key=lambda m: (m.position, str(m.path), m.frame or 0))
    first = _dcmread(members[0].path, header_only=True)
    series = _Series(
        key=key,
        thickness=thickness,
        study_uid=run.uid(first.get("StudyInstanceUID", ""), key, "study"),
        frame_uid=run.uid(first.get("FrameOfReferenceUID", ""), key, thickness, "frame"),
        series_uid={kind: run.uid(key, thickness, kind, "series") for kind in ("full", "quarter")},
    )
    fluxes: list[float] = []
    refused = 0  # measurable, but noisier than the dose allows (skipped under --skip-bad)
    unmeasured: list[tuple[int, Source, str]] = []
    for n, m in enumerate(members, start=1):
        slice_ = _read(run, m, skipped)
        try:
            if slice_ is not None:
                files.append(_simulate_slice(run, series, m, n, *slice_, notes, None))
                fluxes.append(files[-1]["i0"])
        except NoiseEstimateError as exc:
            unmeasured.append((n, m, str(exc)))
            continue  # counted when it is simulated
        except SourceTooNoisy as exc:
            if not run.skip_bad:
                raise
            skipped.append((str(m.path), str(exc)))
            refused += 1
        bar.update()
    for n, m, reason in unmeasured:
        if not fluxes:
            others = (
                f"its series' {refused} measurable slice(s) were refused as too noisy for the dose"
                if refused
                else "no slice of its series is measurable either"
            )
            message = f"{m.path}: {reason}; {others} (give --i0 to set the flux)"
            if not run.skip_bad:
                raise DicomError(message)
            skipped.append((str(m.path), message))
        else:
            slice_ = _read(run, m, skipped)
            assert slice_ is not None  # it was read once already
            files.append(_simulate_slice(run, series, m, n, *slice_, notes, float(np.median(fluxes))))
            notes.append((str(m.path), f"noise not measurable ({reason}); the series' median flux was used"))
        bar.update()


def _read(run: _Run, m: Source, skipped: list[tuple[str, str]]) -> tuple | None:
    try:
        ds, [(hu, stored, g)] = read_frames(m.path, None if m.frame is None else [m.frame])
    except DicomError as exc:
        if not run.skip_bad:
            raise
        skipped.append((str(m.path), str(exc)))
        return None
    return ds, hu, stored, g


def _quarter(
    run: _Run, m: Source, hu: np.ndarray, spacing: float, rng: np.random.Generator, series_i0: float | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """The quarter dose of one slice and its calibration record (sidecar and DICOM)."""
    if run.i0 is None and series_i0 is None:
        low, record = insert_calibrated(
            hu, spacing, run.dose, rng, run.electronic_noise, seed=run.seed, what=str(m.path)
        )
        return low, {**record, "calibration": "native"}
    i0 = run.i0 if run.i0 is not None else series_i0
    low = simulate_low_dose(
        hu, run.dose, rng, i0=i0, electronic_noise=run.electronic_noise, pixel_size_mm=spacing
    )
    record: dict[str, Any] = {"i0": float(f"{i0:.4g}"), "pixel_size_mm": float(f"{spacing:.6g}")}
    record["calibration"] = "fixed i0" if run.i0 is not None else "series median i0"
    try:
        record["effective_dose"] = round(effective_dose(hu, low, spacing), 4)
    except NoiseEstimateError:
        record["effective_dose"] = None  # not measurable on this slice
    return low, record


def _simulate_slice(
    run: _Run,
    series: _Series,
    m: Source,
    n: int,
    ds: pydicom.Dataset,
    hu: np.ndarray,
    stored: np.ndarray,
    g: FrameGeometry,
    notes: list[tuple[str, str]],
    series_i0: float | None,
) -> dict[str, Any]:
    """Write the full/quarter pair of one source slice (instance ``n``); its sidecar entry."""
    source_sop = str(ds.get("SOPInstanceUID", ""))
    digest = hashlib.sha256(f"{source_sop}\0{m.frame}\0{m.path.name}".encode()).digest()
    rng = np.random.default_rng([run.seed, int.from_bytes(digest[:8], "little")])
    spacing = float(np.mean(g.spacing))
    signed = stored.dtype.kind == "i"
    if stored.dtype.itemsize > 2 or stored.dtype.kind not in "iu":
        raise DicomError(f"{m.path}: {stored.dtype} pixels; only 16-bit CT is supported")
    low, record = _quarter(run, m, hu, spacing, rng, series_i0)
    ts_in = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    ts_out, ts_note = output_syntax(ts_in, run.keep_transfer_syntax)
    if ts_note:
        notes.append((str(m.path), ts_note))
    entry = {"source": str(m.path.relative_to(run.src)), "source_sop": source_sop, "frame": m.frame, **record}
    for kind, pixels in (
        ("full", stored.astype(np.int16 if signed else np.uint16)),
        ("quarter", hu_to_stored(low, g.slope, g.intercept, signed)),
    ):
        sop = run.uid(source_sop, m.frame, kind, "sop")
        out = _derived_slice(run, series, kind, pixels, sop, ds, g, n, m.series_number, record)
        rel = Path(series.key) / f"{kind}_{series.thickness}" / f"{n}.IMA"
        save(out, run.tmp / rel, ts_out)
        entry[kind] = str(rel)
        entry[f"{kind}_sop"] = sop
    return entry


def _derived_slice(
    run: _Run,
    series: _Series,
    kind: str,
    pixels: np.ndarray,
    sop: str,
    ds: pydicom.Dataset,
    g: FrameGeometry,
    n: int,
    number_in: int,
    record: dict[str, Any],
) -> pydicom.Dataset:
    """The ``kind`` ("full" | "quarter") dataset of one source slice, marked as derived."""
    source_sop = str(ds.get("SOPInstanceUID", ""))
    out = ct_slice(
        pixels,
        slope=g.slope,
        intercept=g.intercept,
        sop_uid=sop,
        series_uid=series.series_uid[kind],
        study_uid=series.study_uid,
        frame_uid=series.frame_uid,
        series_description=(
            "Full Dose Images" if kind == "full" else f"Quarter Dose Images (simulated, dose {run.dose:g})"
        ),
        series_number=number_in,
        instance=n,
        spacing=g.spacing,
        position=g.position,
        orientation=g.orientation,
        thickness=g.thickness,
        template=ds,
        image_type=[str(v) for v in (ds.get("ImageType") or ["ORIGINAL", "PRIMARY", "AXIAL"])],
    )
    derivation = f"ldct {ldct.__version__} data simulate: " + (
        "full dose, the source image's HU re-encoded"
        if kind == "full"
        else f"simulated effective dose {run.dose:g}{_measured(record)}, I0 {record['i0']:g} "
        f"({record['calibration']}{_native(record)}), electronic noise {run.electronic_noise:g}, seed "
        f"{run.seed}; {INSERTION_METHOD}"
    )
    mark_derived(
        out,
        derivation=derivation,
        series_number=number_in if kind == "full" else derived_series_number(number_in),
        sources=[(str(ds.SOPClassUID), source_sop)],
        contribution="ldct data simulate",
    )
    if kind == "quarter":
        out.ImageComments = "ldct calibration " + json.dumps(record, sort_keys=True)
    if kind == "full":
        # Same pixels as the source: keep its ImageType (ORIGINAL stays ORIGINAL).
        out.ImageType = [str(v) for v in (ds.get("ImageType") or ["ORIGINAL", "PRIMARY", "AXIAL"])]
    return out


def _measured(record: dict[str, Any]) -> str:
    dose = record.get("effective_dose")
    return "" if dose is None else f" (measured {dose:.3f})"


def _native(record: dict[str, Any]) -> str:
    sigma = record.get("native_sigma_hu")
    return "" if sigma is None else f" to the native noise {sigma:.2f} HU"
