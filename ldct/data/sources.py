"""The inputs of ``ldct data simulate``: which files under a folder are routine-dose CT slices,
and which output patient directory and series number each one's pair goes to.

A Mayo or TCIA tree gives its full-dose series (its own low-dose series is never a source); any
other folder gives every CT file in it, single-frame or Enhanced CT. Headers only: the pixels are
read by :mod:`ldct.data.simulate_tree`, one slice at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom

from ldct.data.dicom import DicomError, LocalizerImage, _dcmread, frame_geometry
from ldct.data.discovery import _dose_of, _is_dicom_candidate, _mayo_series_dirs, _subdirs, detect_layout


@dataclass
class Source:
    """One input slice (a file, or one frame of an Enhanced CT file)."""

    path: Path
    frame: int | None
    key: str  # patient directory name in the output
    thickness: str  # "<t>mm"
    position: float  # along the slice normal, for instance numbering
    series_number: int = 1  # the input series' SeriesNumber (1 when it has none)


def _safe_name(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in text.strip())
    return keep.strip("._") or "patient"


def _candidate_inputs(root: Path) -> tuple[list[Path], str | None]:
    """The files to simulate from (a Mayo tree: its full_* series; else every file) and the
    layout the indexer sees (None for a plain folder)."""
    try:
        layout = detect_layout(root)
    except DicomError:
        layout = None
    files = sorted(p for p in root.rglob("*") if p.is_file() and _is_dicom_candidate(p))
    if layout == "mayo":
        full_dirs = {
            d
            for patient in _subdirs(root)
            for (kind, _), d in _mayo_series_dirs(patient).items()
            if kind == "full"
        }
        files = [f for f in files if f.parent in full_dirs]
    return files, layout


def find_sources(
    src: Path, skip_bad: bool
) -> tuple[list[Source], list[tuple[str, str]], list[tuple[str, str]]]:
    """(slices to simulate from, skipped files as (path, reason), notes as (path, note)).

    A file that cannot be used raises :class:`DicomError`, or with ``skip_bad`` is listed in the
    skipped ones; a localizer is always left out with a note. No slice at all raises."""
    skipped: list[tuple[str, str]] = []
    notes: list[tuple[str, str]] = []
    sources: list[Source] = []
    series_of: dict[tuple[str, str], list[tuple[pydicom.Dataset, Path]]] = {}
    candidates, layout = _candidate_inputs(src)
    for path in candidates:
        try:
            ds = _dcmread(path, header_only=True)
            frames = frame_geometry(ds, path)
        except LocalizerImage as exc:
            notes.append((str(path), str(exc)))
            continue
        except DicomError as exc:
            if not skip_bad:
                raise
            skipped.append((str(path), str(exc)))
            continue
        dose_of = _dose_of(str(ds.get("SeriesDescription", "")))
        if dose_of == "low" or (layout == "tcia" and dose_of != "full"):
            continue  # a tree's own low-dose (or scout) series: the full dose is the source
        patient = str(ds.get("PatientID", "") or ds.get("PatientName", "") or path.parent.name)
        series_of.setdefault((patient, str(ds.get("SeriesInstanceUID", "") or path.parent)), []).append(
            (ds, path)
        )
        for g in frames:
            t = g.thickness
            sources.append(
                Source(
                    path,
                    g.frame,
                    "",
                    f"{t:g}mm" if t else "3mm",
                    g.along_normal if g.along_normal is not None else 0.0,
                )
            )
    if not sources:
        detail = f"; first problem: {skipped[0][1]}" if skipped else ""
        raise DicomError(f"{src}: no CT slices to simulate from{detail}")
    _assign_series(series_of, sources)
    return sources, skipped, notes


def _assign_series(
    series_of: dict[tuple[str, str], list[tuple[pydicom.Dataset, Path]]], sources: list[Source]
) -> None:
    # Output patient directory per series: PatientID, plus the series number when a patient has several.
    per_patient: dict[str, int] = {}
    for patient, _ in series_of:
        per_patient[patient] = per_patient.get(patient, 0) + 1
    key_of: dict[Path, str] = {}
    series_number_of: dict[Path, int] = {}
    for (patient, _), members in series_of.items():
        number = members[0][0].get("SeriesNumber")
        key = _safe_name(patient) if per_patient[patient] == 1 else f"{_safe_name(patient)}-S{number or 0}"
        for _, path in members:
            key_of[path] = key
            series_number_of[path] = int(number) if number not in (None, "") else 1
    for s_ in sources:
        s_.key = key_of[s_.path]
        s_.series_number = series_number_of[s_.path]
