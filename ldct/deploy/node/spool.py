"""The DICOM node's spool and journal: nothing acknowledged is lost (docs/DESIGN.md §5c).

Layout under the store directory::

    journal.jsonl                 one JSON object per line, appended and fsync'd per event
    series/<SeriesUID>/in/<SOPInstanceUID>.dcm     received instances, as received
    series/<SeriesUID>/out/<SOPInstanceUID>.dcm    the derived instances (derived UIDs)
    tmp/                          partial writes; emptied at start

An instance is written to ``tmp/``, fsync'd, renamed into ``in/`` and the directory fsync'd
before the C-STORE success goes back: a crash after the reply cannot lose it. The instance files
are the record of what was received (a crash between the rename and the journal line loses
nothing: :meth:`Spool.recover` reads ``in/``); the journal records what was done with them
(denoised, forwarded) and why something failed. A resent instance has the same file name and is
not stored twice.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldct.errors import LdctError

JOURNAL = "journal.jsonl"


class SpoolError(LdctError, OSError):
    """The spool cannot take an instance (disk full, series too large, unwritable store)."""


@dataclass
class SeriesState:
    """What the journal and the spool say about one received series."""

    uid: str
    study_uid: str = ""
    received: set[str] = field(default_factory=set)  # source SOPInstanceUIDs on disk
    bytes: int = 0
    denoised: dict[str, list[str]] = field(default_factory=dict)  # source SOP -> derived SOPs
    forwarded: set[str] = field(default_factory=set)  # derived SOPs the destination accepted
    refused: dict[str, str] = field(default_factory=dict)  # source SOP -> why it cannot be denoised
    derived_series_uid: str = ""
    last_received: float = 0.0  # time.monotonic() of the latest instance (or of the recovery)
    forwarded_at: float = 0.0  # time.time() of the latest successful forward
    forward_attempts: int = 0
    next_forward: float = 0.0  # time.monotonic() before which no forward is tried

    @property
    def to_denoise(self) -> set[str]:
        return self.received - set(self.denoised) - set(self.refused)

    @property
    def to_forward(self) -> set[str]:
        return {sop for derived in self.denoised.values() for sop in derived} - self.forwarded

    @property
    def state(self) -> str:
        if self.to_denoise:
            return "received"
        if self.to_forward:
            return "denoised"
        return "forwarded" if self.forwarded else ("refused" if self.refused else "received")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_name(uid: str) -> str:
    """A UID as a file name; anything but digits and dots is refused (no path tricks)."""
    if not uid or len(uid) > 64 or any(c not in "0123456789." for c in uid):
        raise SpoolError(f"{uid!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    return uid


class Spool:
    """Instances on disk and the journal of what happened to each series (thread-safe)."""

    def __init__(
        self,
        root: Path | str,
        max_series_instances: int = 5000,
        max_series_bytes: int = 4 << 30,
        min_free_bytes: int = 64 << 20,
    ) -> None:
        self.root = Path(root)
        self.max_series_instances = int(max_series_instances)
        self.max_series_bytes = int(max_series_bytes)
        self.min_free_bytes = int(min_free_bytes)
        self._lock = threading.RLock()
        self.series: dict[str, SeriesState] = {}
        self._torn = False
        try:
            (self.root / "series").mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / "tmp", ignore_errors=True)
            (self.root / "tmp").mkdir()
            # Raw appends: a failed write leaves nothing in a Python buffer to be written twice later.
            self._journal = os.open(self.root / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            # A crash can leave the last line half-written: the next event starts a line of its own.
            size = os.fstat(self._journal).st_size
            if size:
                with open(self.root / JOURNAL, "rb") as fh:
                    fh.seek(size - 1)
                    self._torn = fh.read(1) != b"\n"
        except OSError as exc:
            raise SpoolError(
                f"cannot use {self.root} as the node's store ({exc}): give a writable --store"
            ) from exc
        self.recover()

    # -- journal ---------------------------------------------------------------------------
    def log(self, event: str, series: str, **fields: Any) -> None:
        """Append one event and fsync it before returning; SpoolError when the disk refuses.

        A lost journal line never loses an instance (the files are the record, and derived UIDs
        are deterministic, so work redone after a crash yields the same instances), but a torn
        line must not swallow the next one: after a failed write the next line starts afresh.
        """
        line = json.dumps({"t": round(time.time(), 3), "event": event, "series": series, **fields})
        with self._lock:
            try:
                data = (("\n" if self._torn else "") + line + "\n").encode()
                if os.write(self._journal, data) != len(data):
                    raise OSError(28, "short write (disk full?)")
                os.fsync(self._journal)
                self._torn = False
            except OSError as exc:
                self._torn = True
                raise SpoolError(
                    f"cannot append to {self.root / JOURNAL} ({exc}); free space or move --store"
                ) from exc

    def events(self) -> list[dict[str, Any]]:
        """Every journal event, oldest first (a torn last line from a crash is ignored)."""
        out = []
        path = self.root / JOURNAL
        for raw in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
        return out

    def recover(self) -> None:
        """Rebuild every series' state from the instance files and the journal."""
        now = time.monotonic()
        with self._lock:
            self.series.clear()
            for directory in sorted((self.root / "series").iterdir()):
                state = SeriesState(uid=directory.name, last_received=now)
                for f in (directory / "in").glob("*.dcm"):
                    state.received.add(f.stem)
                    state.bytes += f.stat().st_size
                self.series[directory.name] = state
            for ev in self.events():
                state = self.series.get(ev.get("series", ""))
                if state is None:
                    continue
                kind = ev.get("event")
                if kind == "received" and ev.get("study"):
                    state.study_uid = ev["study"]
                elif kind == "denoised":
                    state.derived_series_uid = ev.get("derived_series", state.derived_series_uid)
                    state.denoised.update(ev.get("instances", {}))
                elif kind == "refused":
                    state.refused[ev["sop"]] = ev.get("reason", "")
                elif kind == "forwarded":
                    state.forwarded.update(ev.get("instances", []))
                    state.forwarded_at = float(ev.get("t", 0.0))
            # A derived file whose journal line was lost in a crash is made again (same UID).
            for state in self.series.values():
                for source, derived in list(state.denoised.items()):
                    if not all(self.out_path(state.uid, sop).exists() for sop in derived):
                        del state.denoised[source]

    # -- instances -------------------------------------------------------------------------
    def series_dir(self, series_uid: str) -> Path:
        return self.root / "series" / safe_name(series_uid)

    def in_path(self, series_uid: str, sop_uid: str) -> Path:
        return self.series_dir(series_uid) / "in" / f"{safe_name(sop_uid)}.dcm"

    def out_path(self, series_uid: str, sop_uid: str) -> Path:
        return self.series_dir(series_uid) / "out" / f"{safe_name(sop_uid)}.dcm"

    def store(self, series_uid: str, sop_uid: str, study_uid: str, data: bytes) -> bool:
        """Put one received instance on disk durably; False when it was already there.

        Raises :class:`SpoolError` for a full disk or a series over its limits; nothing is left
        half-written either way.
        """
        target = self.in_path(series_uid, sop_uid)
        with self._lock:
            state = self.series.get(series_uid)
            if state is not None and sop_uid in state.received and target.exists():
                state.last_received = time.monotonic()
                return False
            count = len(state.received) if state else 0
            size = state.bytes if state else 0
        if count + 1 > self.max_series_instances:
            raise SpoolError(
                f"series {series_uid} would exceed {self.max_series_instances} instances "
                "(--max-series-instances); split it or raise the limit"
            )
        if size + len(data) > self.max_series_bytes:
            raise SpoolError(
                f"series {series_uid} would exceed {self.max_series_bytes / 2**20:.0f} MiB "
                "(--max-series-mb); split it or raise the limit"
            )
        free = shutil.disk_usage(self.root).free
        if free - len(data) < self.min_free_bytes:
            raise SpoolError(
                f"store {self.root} is full: {free / 2**20:.1f} MiB free, the node keeps "
                f"{self.min_free_bytes / 2**20:.0f} MiB (--min-free-mb); free space or move --store"
            )
        tmp = self.root / "tmp" / f"{sop_uid}.{threading.get_ident()}.part"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SpoolError(
                f"cannot write instance {sop_uid} of series {series_uid} to {self.root} ({exc}); "
                "free space or move --store"
            ) from exc
        with self._lock:
            state = self.series.setdefault(series_uid, SeriesState(uid=series_uid))
            state.received.add(sop_uid)
            state.bytes += len(data)
            state.study_uid = state.study_uid or study_uid
            state.last_received = time.monotonic()
        try:
            self.log("received", series_uid, sop=sop_uid, study=study_uid, bytes=len(data))
        except SpoolError:
            pass  # the instance is durable and recover() finds it in in/: acknowledging it is right
        return True

    def write_derived(self, series_uid: str, sop_uid: str, write: Any) -> Path:
        """Write a derived instance through ``write(path)`` into ``out/`` atomically (fsync'd)."""
        target = self.out_path(series_uid, sop_uid)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "tmp" / f"{sop_uid}.out.part"
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        return target

    def snapshot(self) -> dict[str, SeriesState]:
        """A copy of every series' state that the worker threads can read without the lock."""
        with self._lock:
            return copy.deepcopy(self.series)

    def update(self, series_uid: str, **changes: Any) -> None:
        with self._lock:
            state = self.series[series_uid]
            for key, value in changes.items():
                current = getattr(state, key)
                if isinstance(current, set):
                    current.update(value)
                elif isinstance(current, dict):
                    current.update(value)
                else:
                    setattr(state, key, value)

    def purge(self, older_than_s: float) -> list[str]:
        """Remove the files of every series forwarded in full more than ``older_than_s`` ago.

        The journal keeps their history. An instance of a purged series that arrives again is a
        new receipt: it is denoised and forwarded again, into the same derived UIDs, which the
        destination already holds.
        """
        cutoff = time.time() - older_than_s
        with self._lock:
            done = [
                uid
                for uid, s in self.series.items()
                if s.forwarded_at and s.forwarded_at < cutoff and not s.to_denoise and not s.to_forward
            ]
            for uid in done:
                shutil.rmtree(self.series_dir(uid), ignore_errors=True)
                del self.series[uid]
        for uid in done:
            self.log("purged", uid, older_than_s=older_than_s)
        return done

    def close(self) -> None:
        with self._lock:
            if self._journal >= 0:
                os.close(self._journal)
                self._journal = -1
