"""The cache's on-disk format: ``manifest.json`` and the per-patient int16 arrays.

``CACHE/<patient>_low.npy`` and ``CACHE/<patient>_full.npy`` hold int16 HU volumes [S, H, W]
(memory-mappable with ``np.load(mmap_mode="r")``); ``CACHE/manifest.json`` says where they came
from (root, layout, per-slice files, SOPInstanceUIDs and z), how the patients are split, and a
fingerprint (paths, sizes, mtimes) of each patient's source files. Files are written under a
temporary name and renamed into place, so a reader never sees half a file. Building the cache is
:mod:`ldct.data.cache`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ldct.data.discovery import default_split, split_patients
from ldct.errors import LdctError

MANIFEST = "manifest.json"
# 2: each patient entry carries "body_part" (DICOM BodyPartExamined, "" if absent), which picks
# the window of its metrics; a version-1 cache is rebuilt (ldct.data.cache reads it as stale).
MANIFEST_VERSION = 2
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


class CacheError(LdctError, ValueError):
    """A cache that cannot be used as asked (foreign or corrupt manifest, unknown split); the
    message says what to run or choose."""


class CacheNotFound(LdctError, FileNotFoundError):
    """No cache manifest where one was expected; the message gives the command that builds it."""


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


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` under a temporary name, then rename: a reader sees the old array or the new one."""
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


# --------------------------------------------------------------------------- manifest


def load_manifest(cache_dir: Path | str) -> Manifest:
    """Read ``CACHE/manifest.json``; a missing or foreign manifest raises with what to run."""
    path = Path(cache_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheNotFound(
            f"{path}: no cache manifest; build it with `ldct data index ROOT --cache {cache_dir}`"
        ) from None
    except ValueError as exc:
        raise CacheError(f"{path}: not valid JSON ({exc}); rebuild with `ldct data index`") from exc
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        raise CacheError(
            f"{path}: manifest version {data.get('version') if isinstance(data, dict) else '?'} is not "
            f"{MANIFEST_VERSION}; rebuild the cache with `ldct data index`"
        )
    known = {f.name for f in dataclasses.fields(Manifest)}
    return Manifest(**{k: v for k, v in data.items() if k in known})


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


def write_manifest(
    cache_dir: Path,
    root: Path,
    layout: str,
    source: str,
    mayo_thickness: str,
    skip_bad: bool,
    entries: dict[str, dict[str, Any]],
    skipped: list[list[str]],
    val: Sequence[str],
    test: Sequence[str],
    old: Manifest | None,
) -> Manifest:
    """Write the manifest of ``entries`` (splits chosen as :func:`_choose_splits` says); a
    manifest identical to the one on disk is not rewritten, so a no-op build touches nothing."""
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


def body_parts(cache_dir: Path | str, patients: Sequence[str]) -> dict[str, str]:
    """Each cached patient's DICOM BodyPartExamined ("" where its full-dose series has none)."""
    manifest = load_manifest(cache_dir)
    missing = [p for p in patients if p not in manifest.patients]
    if missing:
        raise CacheError(
            f"patients {missing} are not in the cache {cache_dir}; cached: {manifest.all_patients}"
        )
    return {p: str(manifest.patients[p].get("body_part") or "") for p in patients}


def resolve_splits(
    manifest: Manifest, val: Sequence[str] = (), test: Sequence[str] = ()
) -> dict[str, list[str]]:
    """The manifest's splits, with ``val``/``test`` (when non-empty) overriding them."""
    chosen_test = list(test) or manifest.splits.get("test", [])
    chosen_val = list(val) or [p for p in manifest.splits.get("val", []) if p not in chosen_test]
    return split_patients(manifest.all_patients, chosen_val, chosen_test)
