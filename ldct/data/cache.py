"""The on-disk HU cache: per-patient int16 arrays and a manifest.

``CACHE/<patient>_low.npy`` and ``CACHE/<patient>_full.npy`` hold int16 HU volumes [S, H, W]
(memory-mappable with ``np.load(mmap_mode="r")``); ``CACHE/manifest.json`` says where they came
from (root, layout, per-slice files, SOPInstanceUIDs and z), how the patients are split, and a
fingerprint (paths, sizes, mtimes) of each patient's source files.

Re-running :func:`build_cache` re-reads only patients whose fingerprint changed; an unchanged
tree is a no-op that rewrites nothing. Every file is written to a temporary name and renamed into
place, and the manifest is written last, so an interrupted run leaves a manifest that describes
exactly the arrays on disk (or the previous, still valid, state).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ldct.data.dicom import (
    BUILTIN_MARKER,
    DicomError,
    default_split,
    detect_layout,
    discover,
    patient_files,
    read_hu,
    split_patients,
)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass
class Manifest:
    version: int
    root: str
    layout: str  # "mayo" | "tcia"
    source: str  # "builtin" | "dicom"
    splits: dict[str, list[str]]
    patients: dict[str, dict[str, Any]]
    mayo_thickness: str = "3mm"
    skip_bad: bool = False
    # Patients (or files of patients) that produced no cached slices, as [path, reason].
    skipped: list[list[str]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"

    @property
    def all_patients(self) -> list[str]:
        return sorted(self.patients)


# --------------------------------------------------------------------------- small file helpers


def _default_mode(mode: int = 0o666) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _default_mode())  # mkstemp makes 0600; cached data is as readable as any file
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npy.tmp", dir=path.parent)
    try:
        os.fchmod(fd, _default_mode())
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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


# --------------------------------------------------------------------------- manifest


def load_manifest(cache_dir: Path | str) -> Manifest:
    """Read ``CACHE/manifest.json``; a missing or foreign manifest raises with what to run."""
    path = Path(cache_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no cache manifest; build it with `ldct data index ROOT --cache {cache_dir}`"
        ) from None
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); rebuild with `ldct data index`") from exc
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{path}: manifest version {data.get('version') if isinstance(data, dict) else '?'} is not "
            f"{MANIFEST_VERSION}; rebuild the cache with `ldct data index`"
        )
    known = {f.name for f in dataclasses.fields(Manifest)}
    return Manifest(**{k: v for k, v in data.items() if k in known})


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


def _choose_splits(
    patients: list[str], val: Sequence[str], test: Sequence[str], old: Manifest | None, builtin: bool
) -> dict[str, list[str]]:
    """Named splits win; otherwise keep the previous manifest's (if still valid), else defaults."""
    present = set(patients)

    def previous(name: str) -> list[str] | None:
        if old is None or name not in old.splits or not set(old.splits[name]) <= present:
            return None
        return list(old.splits[name])

    chosen_test = list(test) or previous("test")
    if chosen_test is None:
        chosen_test = default_split(patients, builtin=builtin)[1]
    chosen_val = list(val) or previous("val")
    if chosen_val is None or set(chosen_val) & set(chosen_test):
        default_val = default_split(patients, builtin=builtin)[0]
        if builtin and default_val and not set(default_val) & set(chosen_test):
            chosen_val = default_val
        else:
            # The last remaining patient, if one still trains.
            rest = [p for p in sorted(patients) if p not in chosen_test and not (builtin and p == "CTSMALL")]
            chosen_val = rest[-1:] if len(rest) > 1 else []
    return split_patients(patients, chosen_val, chosen_test)


# --------------------------------------------------------------------------- build


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
    kept, else the defaults (built-in: val = HEAD693, test = ABDOMEN + CTSMALL; otherwise test =
    last patient, val = second-to-last).
    """
    from tqdm import tqdm

    root = Path(root).resolve()
    cache_dir = Path(cache_dir)
    layout = detect_layout(root)
    source = "builtin" if (root / BUILTIN_MARKER).is_file() else "dicom"
    cache_dir.mkdir(parents=True, exist_ok=True)

    old: Manifest | None = None
    with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
        old = load_manifest(cache_dir)
    if old is not None and (old.root, old.layout, old.mayo_thickness) != (str(root), layout, mayo_thickness):
        old = None  # another tree or thickness: nothing to reuse (its arrays are overwritten)

    files = patient_files(root, layout, mayo_thickness)
    fingerprints = {p: _fingerprint(root, fs) for p, fs in files.items()}
    entries: dict[str, dict[str, Any]] = {}
    changed: list[str] = []
    for patient, fp in fingerprints.items():
        prev = old.patients.get(patient) if old is not None else None
        reusable = (
            prev is not None
            and prev.get("fingerprint") == fp
            and (skip_bad or not prev.get("skipped"))  # strict run must see files a lenient one skipped
            and _arrays_present(cache_dir, prev)
        )
        if reusable:
            entries[patient] = prev
        else:
            changed.append(patient)

    def save(entries: dict[str, dict[str, Any]], skipped: list[list[str]]) -> Manifest:
        return _write_manifest(
            cache_dir, root, layout, source, mayo_thickness, skip_bad, entries, skipped, val, test, old
        )

    skipped: list[list[str]] = []
    if changed:
        found = discover(root, mayo_thickness=mayo_thickness, skip_bad=skip_bad, patients=changed)
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
        total = sum(len(v) for v in found.patients.values())
        bar = tqdm(total=total, desc=f"index {root.name}", unit="slice", disable=not progress)
        writing: list[str] = []  # the patient whose arrays are being replaced, if any
        try:
            for patient in sorted(found.patients):
                pairs = found.patients[patient]
                entry = _read_patient(
                    root, cache_dir, patient, pairs, fingerprints[patient], skip_bad, bar, writing
                )
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
            if old is not None:
                for p, e in old.patients.items():
                    if p not in entries and p in fingerprints and p not in writing:
                        entries[p] = e
            if entries:
                save(entries, skipped)
            raise
        finally:
            bar.close()
        for patient in changed:
            if patient not in found.patients and not any(
                s[0].split(os.sep, 1)[0] == patient for s in skipped
            ):
                skipped.append([patient, "no usable slice pairs"])  # e.g. an empty patient directory
    if not entries:
        raise DicomError(f"{root}: no patient could be cached; see the skipped files: {skipped[:3]}")
    manifest = save(entries, skipped)
    # Arrays of patients that left the tree go last: the new manifest no longer refers to them.
    keep = {name for e in manifest.patients.values() for name in e["arrays"].values()}
    for stale in cache_dir.glob("*_low.npy"):
        for f in (stale, stale.with_name(stale.name.replace("_low.npy", "_full.npy"))):
            if f.name not in keep:
                with contextlib.suppress(OSError):
                    f.unlink()
    return manifest


def _read_patient(root, cache_dir, patient, pairs, fingerprint, skip_bad, bar, writing) -> dict[str, Any]:
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
    if slices:
        writing.append(patient)
        _atomic_save_npy(cache_dir / arrays["low"], np.stack(lows))
        _atomic_save_npy(cache_dir / arrays["full"], np.stack(fulls))
    return {
        "arrays": arrays,
        "shape": [len(slices), h, w],
        "spacing": [float(v) for v in pairs[0].spacing],
        "thickness": pairs[0].thickness,
        "fingerprint": fingerprint,
        "slices": slices,
        "skipped": skipped,
    }


def _write_manifest(
    cache_dir, root, layout, source, mayo_thickness, skip_bad, entries, skipped, val, test, old
):
    patients = sorted(entries)
    manifest = Manifest(
        version=MANIFEST_VERSION,
        root=str(root),
        layout=layout,
        source=source,
        splits=_choose_splits(patients, val, test, old, builtin=source == "builtin"),
        patients={p: entries[p] for p in patients},
        mayo_thickness=mayo_thickness,
        skip_bad=skip_bad,
        skipped=sorted(skipped),
    )
    data = manifest.to_json().encode()
    path = cache_dir / MANIFEST
    try:
        unchanged = path.read_bytes() == data
    except OSError:
        unchanged = False
    if not unchanged:
        _atomic_write_bytes(path, data)
    return manifest


# --------------------------------------------------------------------------- readers


def open_patient(cache_dir: Path | str, patient: str) -> tuple[np.ndarray, np.ndarray]:
    """(low, full) int16 HU memmaps [S, H, W] of one cached patient."""
    cache_dir = Path(cache_dir)
    manifest = load_manifest(cache_dir)
    if patient not in manifest.patients:
        raise KeyError(
            f"patient {patient!r} is not in the cache {cache_dir}; cached: {manifest.all_patients}"
        )
    arrays = manifest.patients[patient]["arrays"]
    return (
        np.load(cache_dir / arrays["low"], mmap_mode="r"),
        np.load(cache_dir / arrays["full"], mmap_mode="r"),
    )


def resolve_splits(
    manifest: Manifest, val: Sequence[str] = (), test: Sequence[str] = ()
) -> dict[str, list[str]]:
    """The manifest's splits, with ``val``/``test`` (when non-empty) overriding them."""
    chosen_test = list(test) or manifest.splits.get("test", [])
    chosen_val = list(val) or [p for p in manifest.splits.get("val", []) if p not in chosen_test]
    return split_patients(manifest.all_patients, chosen_val, chosen_test)


# --------------------------------------------------------------------------- ensure_data


def ldct_home() -> Path:
    """``$LDCT_HOME``, default ``~/.cache/ldct``."""
    return Path(os.environ.get("LDCT_HOME") or Path.home() / ".cache" / "ldct").expanduser()


def builtin_dir(data_cfg) -> Path:
    """Where the built-in set for these DataConfig parameters lives (``$LDCT_HOME/builtin-<hash>``)."""
    from ldct.data.builtin import builtin_params
    from ldct.data.phantoms import PHANTOM_PIXEL_MM

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


def ensure_data(data_cfg) -> tuple[Path, dict[str, list[str]]]:
    """Cache directory and patient splits for a DataConfig, building what is missing.

    ``root == ""``: the built-in DICOM tree and its cache are made once under
    ``$LDCT_HOME/builtin-<params hash>/{dicom,cache}`` (a lock makes concurrent callers wait for
    the first). Otherwise ``root`` is indexed (incrementally) into ``cache`` or
    ``<root>/../<root name>-cache``. Non-empty ``val_patients``/``test_patients`` override the
    manifest's splits.
    """
    from ldct.data.builtin import write_builtin

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


def baseline_table(cache_dir: Path | str, split: str = "test", batch: int = 16) -> dict[str, Any]:
    """LDCT-vs-full-dose metrics of a split: per patient and the mean over all its slices."""
    from ldct.metrics import METRIC_NAMES, MetricAccumulator

    manifest = load_manifest(cache_dir)
    if split not in manifest.splits:
        raise ValueError(f"unknown split {split!r}; the cache has {sorted(manifest.splits)}")
    patients = manifest.splits[split]
    if not patients:
        raise ValueError(f"split {split!r} of {cache_dir} has no patients; splits: {manifest.splits}")
    rows = []
    overall = MetricAccumulator()
    for patient in patients:
        low, full = open_patient(cache_dir, patient)
        acc = MetricAccumulator()
        for start in range(0, low.shape[0], batch):
            lo = np.asarray(low[start : start + batch], dtype=np.float32)
            fu = np.asarray(full[start : start + batch], dtype=np.float32)
            acc.update(lo, fu)
            overall.update(lo, fu)
        rows.append({"patient": patient, "slices": int(low.shape[0]), **acc.mean()})
    mean = overall.mean()
    return {
        "split": split,
        "patients": rows,
        "mean": {"slices": overall.count, **{k: mean[k] for k in METRIC_NAMES}},
    }
