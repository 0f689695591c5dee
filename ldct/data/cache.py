"""Building the on-disk HU cache from a DICOM tree, and making the data of a config ready.

The format (per-patient int16 arrays and ``manifest.json``) is :mod:`ldct.data.manifest`.
Re-running :func:`build_cache` re-reads only patients whose fingerprint changed; an unchanged
tree is a no-op that rewrites nothing. Every file is written to a temporary name and renamed into
place, and the manifest is written last, so an interrupted run leaves a manifest that describes
exactly the arrays on disk (or the previous, still valid, state).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from ldct.config import DataConfig
from ldct.data.builtin import builtin_params, write_builtin
from ldct.data.dicom import DicomError, read_hu
from ldct.data.discovery import BUILTIN_MARKER, Discovery, SlicePair, detect_layout, discover, patient_files
from ldct.data.manifest import (
    CacheError,
    Manifest,
    atomic_save_npy,
    body_parts,
    load_manifest,
    open_patient,
    resolve_splits,
    write_manifest,
)
from ldct.data.phantoms import PHANTOM_PIXEL_MM
from ldct.metrics import METRIC_NAMES, MetricAccumulator, resolve_window


def _fingerprint(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _rel(root: Path, path: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _arrays_present(cache_dir: Path, entry: dict) -> bool:
    shape = tuple(entry["shape"])
    for name in entry["arrays"].values():
        try:
            arr = np.load(cache_dir / name, mmap_mode="r")
        except (OSError, ValueError):
            return False
        if arr.shape != shape or arr.dtype != np.int16:
            return False
    return True


# --------------------------------------------------------------------------- build


@dataclass
class _Build:
    """What every step of one :func:`build_cache` run needs."""

    root: Path
    cache_dir: Path
    layout: str
    source: str  # "builtin" | "dicom"
    mayo_thickness: str
    skip_bad: bool
    val: Sequence[str]
    test: Sequence[str]
    old: Manifest | None  # the previous manifest, if it describes this tree and thickness

    def save(self, entries: dict[str, dict[str, Any]], skipped: list[list[str]]) -> Manifest:
        return write_manifest(
            self.cache_dir,
            self.root,
            self.layout,
            self.source,
            self.mayo_thickness,
            self.skip_bad,
            entries,
            skipped,
            self.val,
            self.test,
            self.old,
        )


def build_cache(
    root: Path | str,
    cache_dir: Path | str,
    mayo_thickness: str = "3mm",
    skip_bad: bool = False,
    val: Sequence[str] = (),
    test: Sequence[str] = (),
    progress: bool = True,
) -> Manifest:
    """Index ``root`` into ``cache_dir`` (incremental, idempotent; see the module docstring).

    ``val``/``test`` name held-out patients; when empty, the splits of an existing manifest are
    kept, else the defaults (built-in: val = PH01, test = PH02, the real slices train; otherwise test =
    last patient, val = second-to-last).
    """
    root = Path(root).resolve()
    cache_dir = Path(cache_dir)
    layout = detect_layout(root)
    source = "builtin" if (root / BUILTIN_MARKER).is_file() else "dicom"
    cache_dir.mkdir(parents=True, exist_ok=True)
    old = _previous_manifest(cache_dir, root, layout, mayo_thickness)
    run = _Build(root, cache_dir, layout, source, mayo_thickness, skip_bad, val, test, old)

    files = patient_files(root, layout, mayo_thickness)
    fingerprints = {p: _fingerprint(root, fs) for p, fs in files.items()}
    entries, changed = _reusable_entries(run, fingerprints)
    skipped: list[list[str]] = []
    if changed:
        _index_changed(run, changed, fingerprints, entries, skipped, progress)
    if not entries:
        raise DicomError(f"{root}: no patient could be cached; see the skipped files: {skipped[:3]}")
    manifest = run.save(entries, skipped)
    _remove_stale_arrays(cache_dir, manifest)
    return manifest


def _previous_manifest(cache_dir: Path, root: Path, layout: str, mayo_thickness: str) -> Manifest | None:
    old: Manifest | None = None
    with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
        old = load_manifest(cache_dir)
    if old is not None and (old.root, old.layout, old.mayo_thickness) != (str(root), layout, mayo_thickness):
        old = None  # another tree or thickness: nothing to reuse (its arrays are overwritten)
    return old


def _reusable_entries(
    run: _Build, fingerprints: dict[str, str]
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(entries of the patients whose cached arrays still hold, the patients to (re)read)."""
    entries: dict[str, dict[str, Any]] = {}
    changed: list[str] = []
    for patient, fp in fingerprints.items():
        prev = run.old.patients.get(patient) if run.old is not None else None
        reusable = (
            prev is not None
            and prev.get("fingerprint") == fp
            and (run.skip_bad or not prev.get("skipped"))  # strict run must see files a lenient one skipped
            and _arrays_present(run.cache_dir, prev)
        )
        if reusable:
            entries[patient] = prev
        else:
            changed.append(patient)
    return entries, changed


def _index_changed(
    run: _Build,
    changed: list[str],
    fingerprints: dict[str, str],
    entries: dict[str, dict[str, Any]],
    skipped: list[list[str]],
    progress: bool,
) -> None:
    """Discover and read the ``changed`` patients into ``entries`` (problems into ``skipped``)."""
    from tqdm import tqdm

    root = run.root
    found = discover(root, mayo_thickness=run.mayo_thickness, skip_bad=run.skip_bad, patients=changed)
    by_patient, notes = _problems_by_patient(root, found, skipped)
    total = sum(len(v) for v in found.patients.values())
    bar = tqdm(total=total, desc=f"index {root.name}", unit="slice", disable=not progress)
    writing: list[str] = []  # the patient whose arrays are being replaced, if any
    try:
        for patient in sorted(found.patients):
            entry = _read_patient(run, patient, found.patients[patient], fingerprints[patient], bar, writing)
            entry["skipped"] = by_patient.get(patient, []) + entry["skipped"]
            if notes.get(patient):
                entry["notes"] = notes[patient]
            if entry["shape"][0] == 0:
                skipped.append([patient, "no slice pair could be read"])
                continue
            entries[patient] = entry
            writing.clear()
    except BaseException:
        # Keep what is done: the manifest then matches the arrays on disk. Patients not yet
        # (re)read keep their previous entry, since their arrays were not touched; a patient
        # interrupted while its arrays were being replaced is dropped (re-read next time).
        if run.old is not None:
            for p, e in run.old.patients.items():
                if p not in entries and p in fingerprints and p not in writing:
                    entries[p] = e
        if entries:
            run.save(entries, skipped)
        raise
    finally:
        bar.close()
    for patient in changed:
        if patient not in found.patients and not any(s[0].split(os.sep, 1)[0] == patient for s in skipped):
            skipped.append([patient, "no usable slice pairs"])  # e.g. an empty patient directory


def _problems_by_patient(
    root: Path, found: Discovery, skipped: list[list[str]]
) -> tuple[dict[str, list[list[str]]], dict[str, list[list[str]]]]:
    """(skipped files, notes) per cached patient; a skip of a patient left out goes to ``skipped``."""
    by_patient: dict[str, list[list[str]]] = {}
    for path, reason in found.skipped:
        rel = _rel(root, path)
        owner = rel.split(os.sep, 1)[0]
        target = by_patient.setdefault(owner, []) if owner in found.patients else skipped
        target.append([rel, reason])
    notes: dict[str, list[list[str]]] = {}
    for path, note in found.notes:
        rel = _rel(root, path)
        notes.setdefault(rel.split(os.sep, 1)[0], []).append([rel, note])
    return by_patient, notes


def _remove_stale_arrays(cache_dir: Path, manifest: Manifest) -> None:
    # Arrays of patients that left the tree go last: the new manifest no longer refers to them.
    keep = {name for e in manifest.patients.values() for name in e["arrays"].values()}
    for stale in cache_dir.glob("*_low.npy"):
        for f in (stale, stale.with_name(stale.name.replace("_low.npy", "_full.npy"))):
            if f.name not in keep:
                with contextlib.suppress(OSError):
                    f.unlink()


def _read_patient(
    run: _Build, patient: str, pairs: list[SlicePair], fingerprint: str, bar: Any, writing: list[str]
) -> dict[str, Any]:
    """Read one patient's pairs into its int16 arrays; its manifest entry (``shape[0] == 0``: none)."""
    root, cache_dir, skip_bad = run.root, run.cache_dir, run.skip_bad
    lows, fulls, slices, skipped = [], [], [], []
    for pair in pairs:
        try:
            low, _ = read_hu(pair.low, frame=pair.low_frame)
            full, _ = read_hu(pair.full, frame=pair.full_frame)
        except DicomError as exc:
            if not skip_bad:
                raise
            skipped.append([_rel(root, pair.low), str(exc)])
            bar.update()
            continue
        if low.shape != tuple(pair.shape) or full.shape != tuple(pair.shape):
            msg = (
                f"{pair.low}: pixel data shape {low.shape}/{full.shape} differs from its header {pair.shape}"
            )
            if not skip_bad:
                raise DicomError(msg)
            skipped.append([_rel(root, pair.low), msg])
            bar.update()
            continue
        # Rounded HU fit int16 for any real CT; half the memory of float32 and memory-mappable.
        lows.append(np.clip(np.rint(low), -32768, 32767).astype(np.int16))
        fulls.append(np.clip(np.rint(full), -32768, 32767).astype(np.int16))
        record = {
            "z": pair.z,
            "low": _rel(root, pair.low),
            "full": _rel(root, pair.full),
            "low_sop": pair.low_sop,
            "full_sop": pair.full_sop,
        }
        for key, frame in (("low_frame", pair.low_frame), ("full_frame", pair.full_frame)):
            if frame is not None:
                record[key] = frame
        slices.append(record)
        bar.update()
    h, w = pairs[0].shape
    arrays = {"low": f"{patient}_low.npy", "full": f"{patient}_full.npy"}
    # One value per patient, from its first cached full-dose slice: it picks the window the
    # patient's slices are scored in (ldct.metrics.window_for).
    body_part = _body_part(root / slices[0]["full"]) if slices else ""
    if slices:
        writing.append(patient)
        atomic_save_npy(cache_dir / arrays["low"], np.stack(lows))
        atomic_save_npy(cache_dir / arrays["full"], np.stack(fulls))
    return {
        "arrays": arrays,
        "shape": [len(slices), h, w],
        "spacing": [float(v) for v in pairs[0].spacing],
        "thickness": pairs[0].thickness,
        "body_part": body_part,
        "fingerprint": fingerprint,
        "slices": slices,
        "skipped": skipped,
    }


def _body_part(path: Path) -> str:
    """BodyPartExamined of one DICOM file, upper-case, "" if absent or unreadable (the file's
    pixels were just read, so a failure here can only be the header tag itself)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["BodyPartExamined"])
    except Exception:  # noqa: BLE001 - a missing tag and an odd header mean the same: no body part
        return ""
    return str(ds.get("BodyPartExamined", "") or "").strip().upper()


# --------------------------------------------------------------------------- ensure_data


def ldct_home() -> Path:
    """``$LDCT_HOME``, default ``~/.cache/ldct``."""
    return Path(os.environ.get("LDCT_HOME") or Path.home() / ".cache" / "ldct").expanduser()


def builtin_dir(data_cfg: DataConfig) -> Path:
    """Where the built-in set for these DataConfig parameters lives (``$LDCT_HOME/builtin-<hash>``)."""
    params = builtin_params(
        data_cfg.builtin_dose,
        data_cfg.builtin_phantoms,
        data_cfg.builtin_slices,
        data_cfg.builtin_size,
        data_cfg.builtin_seed,
        PHANTOM_PIXEL_MM,
    )
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return ldct_home() / f"builtin-{digest}"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (flock): the second process waits, then finds the work done."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_data(data_cfg: DataConfig) -> tuple[Path, dict[str, list[str]]]:
    """Cache directory and patient splits for a DataConfig, building what is missing.

    ``root == ""``: the built-in DICOM tree and its cache are made once under
    ``$LDCT_HOME/builtin-<params hash>/{dicom,cache}`` (a lock makes concurrent callers wait for
    the first). Otherwise ``root`` is indexed (incrementally) into ``cache`` or
    ``<root>/../<root name>-cache``. Non-empty ``val_patients``/``test_patients`` override the
    manifest's splits.
    """
    if not data_cfg.root:
        base = builtin_dir(data_cfg)
        cache_dir = Path(data_cfg.cache).expanduser() if data_cfg.cache else base / "cache"
        with _locked(base / ".lock"):
            if not (base / "dicom" / BUILTIN_MARKER).is_file():
                print(f"[ldct] writing the built-in DICOM set to {base / 'dicom'} (once)", file=sys.stderr)
            dicom = write_builtin(
                base / "dicom",
                dose=data_cfg.builtin_dose,
                phantoms=data_cfg.builtin_phantoms,
                slices=data_cfg.builtin_slices,
                size=data_cfg.builtin_size,
                seed=data_cfg.builtin_seed,
                progress=False,
            )
            manifest = build_cache(dicom, cache_dir, progress=False)
    else:
        root = Path(data_cfg.root).expanduser().resolve()
        cache_dir = (
            Path(data_cfg.cache).expanduser() if data_cfg.cache else root.parent / f"{root.name}-cache"
        )
        with _locked(cache_dir.parent / f".{cache_dir.name}.lock"):
            skip_bad = False
            with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
                skip_bad = load_manifest(cache_dir).skip_bad  # keep what `ldct data index` chose
            manifest = build_cache(root, cache_dir, data_cfg.mayo_thickness, skip_bad=skip_bad, progress=True)
    return cache_dir, resolve_splits(manifest, data_cfg.val_patients, data_cfg.test_patients)


# --------------------------------------------------------------------------- baseline


def baseline_table(
    cache_dir: Path | str, split: str = "test", batch: int = 16, window: str = "auto"
) -> dict[str, Any]:
    """LDCT-vs-full-dose metrics of a split: per patient and the mean over all its slices.

    Each patient's body metrics are in its anatomy window (``window``: "auto" = from its
    BodyPartExamined, or "soft_tissue" / "brain" for all; ``ldct.metrics.resolve_window``).
    """
    manifest = load_manifest(cache_dir)
    if split not in manifest.splits:
        raise CacheError(f"unknown split {split!r}; the cache has {sorted(manifest.splits)}")
    patients = manifest.splits[split]
    if not patients:
        raise CacheError(f"split {split!r} of {cache_dir} has no patients; splits: {manifest.splits}")
    parts = body_parts(cache_dir, patients)
    rows = []
    overall = MetricAccumulator()
    for patient in patients:
        low, full = open_patient(cache_dir, patient)
        hu_window = resolve_window(window, parts[patient])
        acc = MetricAccumulator()
        for start in range(0, low.shape[0], batch):
            lo = np.asarray(low[start : start + batch], dtype=np.float32)
            fu = np.asarray(full[start : start + batch], dtype=np.float32)
            acc.update(lo, fu, hu_window)
            overall.update(lo, fu, hu_window)
        rows.append(
            {
                "patient": patient,
                "slices": int(low.shape[0]),
                "body_part": parts[patient],
                "window": list(hu_window),
                **acc.mean(),
            }
        )
    mean = overall.mean()
    return {
        "split": split,
        "window_mode": window,
        "patients": rows,
        "mean": {"slices": overall.count, **{k: mean[k] for k in METRIC_NAMES}},
    }
