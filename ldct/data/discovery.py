"""DICOM discovery, low/full-dose pairing and patient splits.

Two layouts are understood (docs/DESIGN.md §3):

- Mayo 2016:  ``ROOT/<patient>/{full,quarter}_{1,3}mm/*.IMA``
- TCIA LDCT-and-Projection-data: ``ROOT/<patient>/<study>/<series>/*.dcm``, the dose level read
  from the SeriesDescription ("Full Dose" / "Low Dose").

Discovery reads headers only (``stop_before_pixels=True``) so indexing a large tree is fast; the
pixels are read later, once, by :mod:`ldct.data.cache`. Every problem raises :class:`DicomError`
with the file and what to do, unless ``skip_bad=True``, in which case the file (or the slice it
leaves unpaired) is listed in :attr:`Discovery.skipped` and left out.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ldct.data.dicom import _SKIP_HINT, DicomError, LocalizerImage, _dcmread, frame_geometry

MAYO_LAYOUT = "ROOT/<patient>/{full,quarter}_{1,3}mm/*.IMA (Mayo 2016)"
TCIA_LAYOUT = (
    'ROOT/<patient>/<study>/<series>/*.dcm with "Full Dose" / "Low Dose" in the SeriesDescription '
    "(TCIA LDCT-and-Projection-data)"
)
EXPECTED_LAYOUTS = f"expected {MAYO_LAYOUT} or {TCIA_LAYOUT}"
BUILTIN_MARKER = ".ldct-builtin.json"
# Held-out patients of the built-in set (ldct.data.builtin): phantoms. The real slices train by
# default and are the leave-one-slice-out test folds (`ldct repeat --protocol loso` names one as
# data.test_patients), so no choice is ever made on a real slice's metrics.
BUILTIN_VAL_PATIENTS = ("PH01",)
BUILTIN_TEST_PATIENTS = ("PH02",)

_MAYO_SERIES = re.compile(r"^(full|quarter)_(\d+(?:\.\d+)?)mm$", re.IGNORECASE)
_DICOM_SUFFIXES = {"", ".ima", ".dcm", ".dicom"}
# Slices of the two dose levels are reconstructed on the same grid; their z agree to rounding.
_Z_TOLERANCE_MM = 0.01


@dataclass
class SlicePair:
    """One low-dose slice and the full-dose slice at the same position."""

    patient: str
    # Position on the slice normal in mm (ImagePositionPatient projected on the normal of
    # ImageOrientationPatient; z for an axial series), or the InstanceNumber without positions.
    z: float
    low: Path
    full: Path
    low_sop: str
    full_sop: str
    shape: tuple[int, int] = (0, 0)  # rows, columns
    spacing: tuple[float, float] = (0.0, 0.0)  # PixelSpacing (row, column) in mm
    thickness: float | None = None
    low_frame: int | None = None  # frame index when the slice is one frame of an Enhanced CT file
    full_frame: int | None = None


@dataclass
class Discovery:
    layout: str  # "mayo" | "tcia"
    patients: dict[str, list[SlicePair]]  # sorted by position on the slice normal
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    # Files left out on purpose whatever skip_bad says (localizers), as (path, note).
    notes: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class _Header:
    path: Path
    sop: str
    z: float | None
    instance: int | None
    shape: tuple[int, int]
    spacing: tuple[float, float]
    thickness: float | None
    description: str
    series_uid: str
    frame: int | None = None


# --------------------------------------------------------------------------- files and layouts


def _is_dicom_candidate(path: Path) -> bool:
    # Mayo files end in .IMA, TCIA in .dcm; exported trees often have no suffix or a UID-like name.
    if path.name.startswith("."):
        return False
    suffix = path.suffix.lower()
    return suffix in _DICOM_SUFFIXES or suffix[1:].isdigit()


def _files_in(directory: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        raise DicomError(f"{directory}: cannot list directory ({exc})") from exc
    return [Path(e.path) for e in entries if e.is_file() and _is_dicom_candidate(Path(e.name))]


def _subdirs(directory: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        raise DicomError(f"{directory}: cannot list directory ({exc})") from exc
    return [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")]


def _mayo_series_dirs(patient_dir: Path) -> dict[tuple[str, str], Path]:
    found = {}
    for d in _subdirs(patient_dir):
        m = _MAYO_SERIES.match(d.name)
        if m:
            found[(m.group(1).lower(), m.group(2) + "mm")] = d
    return found


def mayo_thickness_of(series: dict[tuple[str, str], Path], preferred: str) -> str:
    """The thickness of a Mayo patient's pair to use: ``preferred`` if it has both doses there,
    else its only thickness with both doses (a tree of 5 mm and 1 mm patients indexes without a
    flag); ``preferred`` otherwise (several and none preferred: the caller names them)."""
    paired = sorted({t for k, t in series if k == "full" and ("quarter", t) in series})
    if preferred in paired or len(paired) != 1:
        return preferred
    return paired[0]


def detect_layout(root: Path | str) -> str:
    """``"mayo"`` or ``"tcia"``; a missing, empty or unrecognised root raises DicomError."""
    root = Path(root)
    if not root.exists():
        raise DicomError(f"{root}: no such directory; {EXPECTED_LAYOUTS}")
    if not root.is_dir():
        raise DicomError(f"{root}: is a file, not a directory; {EXPECTED_LAYOUTS}")
    patients = _subdirs(root)
    if not patients:
        raise DicomError(f"{root}: contains no patient directories; {EXPECTED_LAYOUTS}")
    if _MAYO_SERIES.match(root.name) or _mayo_series_dirs(root):
        raise DicomError(
            f"{root}: looks like one Mayo patient (or one of its series), not the root of a tree; "
            f"pass the directory that holds the patient directories ({MAYO_LAYOUT})"
        )
    if any(_mayo_series_dirs(p) for p in patients):
        return "mayo"
    for patient in patients:
        for study in _subdirs(patient):
            if any(_files_in(series) for series in _subdirs(study)):
                return "tcia"
    examples = ", ".join(p.name for p in patients[:3])
    raise DicomError(
        f"{root}: no DICOM series found in a known layout (patient directories seen: {examples}); "
        f"{EXPECTED_LAYOUTS}"
    )


def patient_files(root: Path | str, layout: str, mayo_thickness: str = "3mm") -> dict[str, list[Path]]:
    """Candidate DICOM files per patient, without opening them (cheap: used to fingerprint a patient).

    Mayo: the files of ``full_<t>`` and ``quarter_<t>`` (``t`` by :func:`mayo_thickness_of`);
    TCIA: every file under the patient.
    """
    root = Path(root)
    out: dict[str, list[Path]] = {}
    for patient_dir in _subdirs(root):
        if layout == "mayo":
            series = _mayo_series_dirs(patient_dir)
            thickness = mayo_thickness_of(series, mayo_thickness)
            files = []
            for kind in ("full", "quarter"):
                if (kind, thickness) in series:
                    files += _files_in(series[(kind, thickness)])
        else:
            files = [f for study in _subdirs(patient_dir) for s in _subdirs(study) for f in _files_in(s)]
        out[patient_dir.name] = files
    return out


# --------------------------------------------------------------------------- pairing


class _Collector:
    """Raises, or records the problem and carries on, depending on skip_bad."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.skipped: list[tuple[Path, str]] = []
        self.notes: list[tuple[Path, str]] = []

    def fail(self, path: Path, message: str) -> None:
        if not self.skip_bad:
            raise DicomError(message)
        self.skipped.append((path, message))


def _headers_of(path: Path) -> list[_Header]:
    ds = _dcmread(path, header_only=True)
    frames = frame_geometry(ds, path)
    instance = ds.get("InstanceNumber")
    try:
        instance = int(instance) if instance not in (None, "") else None
    except (ValueError, TypeError) as exc:
        raise DicomError(f"{path}: malformed InstanceNumber ({exc}); {_SKIP_HINT}") from exc
    return [
        _Header(
            path=path,
            sop=str(ds.get("SOPInstanceUID", "")),
            z=g.along_normal,
            instance=instance if g.frame is None else (instance or 0) * 100_000 + g.frame + 1,
            shape=g.shape,
            spacing=g.spacing,
            thickness=g.thickness,
            description=str(ds.get("SeriesDescription", "")),
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            frame=g.frame,
        )
        for g in frames
    ]


def _headers(files: list[Path], bad: _Collector) -> list[_Header]:
    out = []
    for f in files:
        try:
            out.extend(_headers_of(f))
        except LocalizerImage as exc:
            bad.notes.append((f, str(exc)))
        except DicomError as exc:
            bad.fail(f, str(exc))
    return out


def _drop_duplicates(headers: list[_Header], key, what: str, bad: _Collector) -> list[_Header]:
    seen: dict[Any, _Header] = {}
    for h in sorted(headers, key=lambda h: (key(h), str(h.path))):
        k = key(h)
        if k in seen:
            bad.fail(
                h.path,
                f"{h.path}: same {what} ({k}) as {seen[k].path.name} in one series; the directory "
                f"mixes two series or holds a duplicate (remove one, {_SKIP_HINT})",
            )
            continue
        seen[k] = h
    return list(seen.values())


def _pair(
    patient: str, low: list[_Header], full: list[_Header], low_dir: str, full_dir: str, bad: _Collector
) -> list[SlicePair]:
    if not low or not full:
        return []
    by_z = all(h.z is not None for h in low + full)
    if not by_z and not all(h.instance is not None for h in low + full):
        for h in low + full:
            if h.z is None and h.instance is None:
                bad.fail(
                    h.path,
                    f"{h.path}: neither ImagePositionPatient nor InstanceNumber, so it cannot be paired "
                    f"with a slice of the other dose ({_SKIP_HINT})",
                )
        low = [h for h in low if h.instance is not None]
        full = [h for h in full if h.instance is not None]
        by_z = False
    if by_z:
        key, what, tol = (lambda h: round(h.z, 3)), "z position", _Z_TOLERANCE_MM
    else:
        key, what, tol = (lambda h: h.instance), "InstanceNumber", 0
    low = sorted(_drop_duplicates(low, key, what, bad), key=key)
    full = sorted(_drop_duplicates(full, key, what, bad), key=key)

    pairs: list[SlicePair] = []
    i = j = 0
    unpaired: list[tuple[_Header, str]] = []
    while i < len(low) or j < len(full):
        if j == len(full) or (i < len(low) and key(low[i]) < key(full[j]) - tol):
            unpaired.append((low[i], full_dir))
            i += 1
        elif i == len(low) or key(full[j]) < key(low[i]) - tol:
            unpaired.append((full[j], low_dir))
            j += 1
        else:
            pairs.append(_make_pair(patient, low[i], full[j], by_z, bad))
            i += 1
            j += 1
    for h, other in unpaired:
        bad.fail(
            h.path,
            f"{h.path}: unpaired slice ({what} {key(h)}) with no slice at the same {what} in {other}; "
            f"a file is missing from one of the two dose series (restore it, {_SKIP_HINT})",
        )
    return [p for p in pairs if p is not None]


def _make_pair(patient: str, lo: _Header, fu: _Header, by_z: bool, bad: _Collector) -> SlicePair | None:
    if lo.shape != fu.shape:
        bad.fail(
            lo.path,
            f"{lo.path}: {lo.shape[0]}x{lo.shape[1]} pixels but its full-dose pair {fu.path} has "
            f"{fu.shape[0]}x{fu.shape[1]}; both doses must share one grid (reconstruct them alike, "
            f"{_SKIP_HINT})",
        )
        return None
    if not np.allclose(lo.spacing, fu.spacing, rtol=1e-4, atol=1e-5):
        bad.fail(
            lo.path,
            f"{lo.path}: PixelSpacing {list(lo.spacing)} mm but its full-dose pair {fu.path} has "
            f"{list(fu.spacing)} mm; both doses must share one grid ({_SKIP_HINT})",
        )
        return None
    return SlicePair(
        patient=patient,
        z=float(lo.z) if by_z else float(lo.instance),
        low=lo.path,
        full=fu.path,
        low_sop=lo.sop,
        full_sop=fu.sop,
        shape=lo.shape,
        spacing=lo.spacing,
        thickness=lo.thickness,
        low_frame=lo.frame,
        full_frame=fu.frame,
    )


def _one_grid(patient: str, pairs: list[SlicePair], bad: _Collector) -> list[SlicePair]:
    """A patient is stored as one [S, H, W] array: keep the slices on the most common grid."""
    if not pairs:
        return pairs
    grid = Counter((p.shape, p.spacing) for p in pairs).most_common(1)[0][0]
    kept = []
    for p in pairs:
        if (p.shape, p.spacing) != grid:
            bad.fail(
                p.low,
                f"{p.low}: {p.shape} pixels at {list(p.spacing)} mm differs from the rest of patient "
                f"{patient} ({grid[0]} at {list(grid[1])} mm); one patient must be one grid ({_SKIP_HINT})",
            )
            continue
        kept.append(p)
    return kept


# --------------------------------------------------------------------------- per layout


def _discover_mayo_patient(patient_dir: Path, thickness: str, bad: _Collector) -> list[SlicePair]:
    series = _mayo_series_dirs(patient_dir)
    thickness = mayo_thickness_of(series, thickness)
    full_dir, low_dir = series.get(("full", thickness)), series.get(("quarter", thickness))
    if full_dir is None or low_dir is None:
        have = ", ".join(sorted(f"{k}_{t}" for k, t in series)) or "nothing"
        others = sorted({t for _, t in series} - {thickness})
        hint = f" (pass --thickness {others[0]})" if others else ""
        missing = " and ".join(
            f"{k}_{thickness}" for k, d in (("full", full_dir), ("quarter", low_dir)) if d is None
        )
        bad.fail(patient_dir, f"{patient_dir}: no {missing} series (found {have}){hint}; {_SKIP_HINT}")
        return []
    full = _headers(_files_in(full_dir), bad)
    low = _headers(_files_in(low_dir), bad)
    for d, hs in ((full_dir, full), (low_dir, low)):
        if not hs:
            bad.fail(d, f"{d}: no readable DICOM slices in this series ({_SKIP_HINT})")
    return _pair(patient_dir.name, low, full, str(low_dir), str(full_dir), bad)


def _dose_of(description: str) -> str | None:
    d = description.lower()
    if "projection" in d:  # DICOM-CT-PD raw data, not images
        return None
    if "full dose" in d or "full-dose" in d:
        return "full"
    if "low dose" in d or "low-dose" in d or "quarter dose" in d:
        return "low"
    return None


def _discover_tcia_patient(patient_dir: Path, thickness: str, bad: _Collector) -> list[SlicePair]:
    by_series: dict[tuple[str, Path], list[_Header]] = {}
    for study in _subdirs(patient_dir):
        for series_dir in _subdirs(study):
            for h in _headers(_files_in(series_dir), bad):
                by_series.setdefault((h.series_uid, series_dir), []).append(h)
    chosen: dict[str, tuple[Path, list[_Header]]] = {}
    for dose in ("full", "low"):
        candidates = [(d, hs) for (_, d), hs in by_series.items() if _dose_of(hs[0].description) == dose]
        if len(candidates) > 1:
            # Several reconstructions of one dose (e.g. 1 mm and 3 mm): take the requested thickness.
            want = float(thickness.removesuffix("mm"))
            fitting = [
                (d, hs) for d, hs in candidates if hs[0].thickness and abs(hs[0].thickness - want) < 0.05
            ]
            if len(fitting) != 1:
                names = ", ".join(
                    f"{d} ({hs[0].description!r}, {hs[0].thickness} mm)" for d, hs in candidates
                )
                bad.fail(
                    patient_dir,
                    f"{patient_dir}: {len(candidates)} {dose}-dose series and not exactly one with "
                    f"SliceThickness {thickness}: {names}; keep one per dose ({_SKIP_HINT})",
                )
                return []
            candidates = fitting
        if candidates:
            chosen[dose] = candidates[0]
    if len(chosen) < 2:
        seen = sorted({hs[0].description for hs in by_series.values()})
        missing = " and ".join(d for d in ("full", "low") if d not in chosen)
        bad.fail(
            patient_dir,
            f"{patient_dir}: no {missing}-dose series (SeriesDescriptions seen: {seen}); {TCIA_LAYOUT} "
            f"({_SKIP_HINT})",
        )
        return []
    (full_dir, full), (low_dir, low) = chosen["full"], chosen["low"]
    return _pair(patient_dir.name, low, full, str(low_dir), str(full_dir), bad)


def discover(
    root: Path | str,
    mayo_thickness: str = "3mm",
    skip_bad: bool = False,
    patients: Sequence[str] | None = None,
) -> Discovery:
    """Find and pair the slices of every patient under ``root`` (headers only).

    ``patients`` restricts discovery to those patient directories (the cache re-reads only the
    patients whose files changed). With ``skip_bad``, bad files and the slices they leave
    unpaired are listed in ``Discovery.skipped`` instead of raising.
    """
    root = Path(root)
    if not re.fullmatch(r"\d+(\.\d+)?mm", mayo_thickness):
        raise DicomError(f"thickness {mayo_thickness!r} must look like '3mm' or '1mm'")
    layout = detect_layout(root)
    bad = _Collector(skip_bad)
    found: dict[str, list[SlicePair]] = {}
    wanted = None if patients is None else set(patients)
    for patient_dir in _subdirs(root):
        if wanted is not None and patient_dir.name not in wanted:
            continue
        if layout == "mayo":
            pairs = _discover_mayo_patient(patient_dir, mayo_thickness, bad)
        else:
            pairs = _discover_tcia_patient(patient_dir, mayo_thickness, bad)
        pairs = _one_grid(patient_dir.name, pairs, bad)
        if pairs:
            found[patient_dir.name] = sorted(pairs, key=lambda p: p.z)
        elif patient_dir not in {p for p, _ in bad.skipped}:
            bad.fail(patient_dir, f"{patient_dir}: no usable slice pairs for patient {patient_dir.name}")
    if not found and wanted is None:
        detail = f"; {len(bad.skipped)} problems skipped, first: {bad.skipped[0][1]}" if bad.skipped else ""
        raise DicomError(f"{root}: no usable low/full-dose slice pairs ({layout} layout){detail}")
    return Discovery(layout=layout, patients=found, skipped=bad.skipped, notes=bad.notes)


# --------------------------------------------------------------------------- splits


def default_split(patients: Sequence[str], builtin: bool = False) -> tuple[list[str], list[str]]:
    """(val, test) when none are named: built-in -> val = PH01, test = PH02 (phantoms; the real
    slices train, and are test folds only when named); otherwise test = last patient (sorted),
    val = second-to-last."""
    names = sorted(patients)
    if builtin and set(BUILTIN_TEST_PATIENTS) <= set(names):
        return [p for p in BUILTIN_VAL_PATIENTS if p in names], list(BUILTIN_TEST_PATIENTS)
    if builtin:  # a single phantom: it is the test patient, nothing validates
        phantoms = [p for p in names if p.startswith("PH")]
        return [], phantoms[:1] or names[-1:]
    if len(names) == 1:
        return [], names
    return names[-2:-1] if len(names) > 2 else [], names[-1:]


def split_patients(patients: Sequence[str], val: Sequence[str], test: Sequence[str]) -> dict[str, list[str]]:
    """``{"train", "val", "test"}`` by patient name; unknown or doubly assigned patients raise."""
    known = sorted(set(patients))
    for name, group in (("val", val), ("test", test)):
        unknown = sorted(set(group) - set(known))
        if unknown:
            raise DicomError(f"{name} patient(s) {unknown} not in the data; known patients: {known}")
    both = sorted(set(val) & set(test))
    if both:
        raise DicomError(f"patient(s) {both} are in both val and test; a patient belongs to one split")
    held = set(val) | set(test)
    return {
        "train": [p for p in known if p not in held],
        "val": sorted(set(val)),
        "test": sorted(set(test)),
    }
