"""The running node: Storage SCP, a denoising thread and a forwarding thread over one spool.

A series is complete when no instance of it has arrived for ``idle_s``; then its instances not
yet denoised are denoised (one by one; a bad one is journalled as refused, the others go on), and
its derived instances not yet forwarded are sent, with exponential backoff while the destination
fails. Both threads read their work from the spool, so a restarted node picks up where the
previous one stopped: received but not denoised, denoised but not forwarded.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldct.deploy.denoise import Denoiser
from ldct.deploy.node.derive import ModelIdentity, derive_instance, derived_series_uid
from ldct.deploy.node.forward import Destination, ForwardError, send
from ldct.deploy.node.scp import application_entity, store_handler
from ldct.deploy.node.spool import SeriesState, Spool, SpoolError


@dataclass
class NodeConfig:
    ae_title: str
    port: int
    destination: Destination
    store: Path
    bind: str = "127.0.0.1"
    idle_s: float = 5.0
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    max_series_instances: int = 5000
    max_series_mb: float = 4096.0
    min_free_mb: float = 64.0
    keep_hours: float = 24.0  # forwarded series' files are removed after this (the journal stays)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class DicomNode:
    """``start()`` listens and works in background threads; ``stop()`` ends both cleanly."""

    def __init__(
        self,
        config: NodeConfig,
        denoiser: Denoiser,
        model: ModelIdentity,
        log: Callable[[str], None] = _log,
    ) -> None:
        self.config = config
        self.denoiser = denoiser
        self.model = model
        self.log = log
        self.spool = Spool(
            config.store,
            max_series_instances=config.max_series_instances,
            max_series_bytes=int(config.max_series_mb * 2**20),
            min_free_bytes=int(config.min_free_mb * 2**20),
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: Any = None

    def pending(self) -> dict[str, str]:
        """Series UID -> state, for every series that still has work."""
        return {uid: s.state for uid, s in self.spool.snapshot().items() if s.to_denoise or s.to_forward}

    def start(self) -> None:
        from pynetdicom import evt

        pending = self.pending()
        if pending:
            self.log(f"[ldct-node] resuming {len(pending)} series from {self.config.store}: {pending}")
        ae = application_entity(self.config.ae_title)
        self._server = ae.start_server(
            (self.config.bind, self.config.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, store_handler(self.spool, self.log))],
        )
        for target, name in (
            (self._denoise_loop, "ldct-node-denoise"),
            (self._forward_loop, "ldct-node-forward"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def request_stop(self) -> None:
        """Ask the threads to end (safe from a signal handler); :meth:`stop` then joins them."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        for thread in self._threads:
            thread.join(timeout=30)
        self.spool.close()

    def wait(self) -> None:
        """Block until :meth:`stop` (or SIGINT/SIGTERM handled by the caller)."""
        while not self._stop.wait(0.5):
            pass

    # -- denoising --------------------------------------------------------------------------
    def _denoise_loop(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            for state in self.spool.snapshot().values():
                if state.to_denoise and now - state.last_received >= self.config.idle_s:
                    self._guarded(self._denoise, state)
                if self._stop.is_set():
                    return

    def _guarded(self, work: Callable[[SeriesState], None], state: SeriesState) -> None:
        """A failure of the store (disk full), or any other surprise, leaves the series pending,
        to be tried again after the idle time; the thread itself never dies of one series."""
        try:
            work(state)
        except Exception as exc:  # noqa: BLE001 - a long-running service logs and goes on
            later = time.monotonic()
            if state.uid in self.spool.series:
                self.spool.update(state.uid, last_received=later, next_forward=later + self.config.idle_s)
            what = str(exc) if isinstance(exc, (OSError, SpoolError)) else f"{type(exc).__name__}: {exc}"
            self.log(
                f"[ldct-node] series {state.uid}: {what}; it stays in the spool and is tried again "
                f"in {self.config.idle_s:g} s"
            )

    def _denoise(self, state: SeriesState) -> None:
        series_uid = state.derived_series_uid or derived_series_uid(state.uid, self.model)
        todo = sorted(state.to_denoise)
        start = time.perf_counter()
        done: dict[str, list[str]] = {}
        for sop in todo:
            if self._stop.is_set():
                break
            try:
                derived = derive_instance(
                    self.spool.in_path(state.uid, sop),
                    self.denoiser,
                    self.model,
                    series_uid,
                    lambda uid, write: self.spool.write_derived(state.uid, uid, write),
                )
            except (OSError, SpoolError) as exc:
                if done:  # keep what was written before the store failed
                    self._record_denoised(state, series_uid, done, start)
                raise SpoolError(f"cannot write its derived instances ({exc})") from exc
            except Exception as exc:  # noqa: BLE001 - one bad instance must not stop its series
                reason = f"{type(exc).__name__}: {exc}"
                self.log(f"[ldct-node] series {state.uid}: instance {sop} not denoised ({reason})")
                self.spool.update(state.uid, refused={sop: reason})
                self.spool.log("refused", state.uid, sop=sop, reason=reason)
                continue
            done[sop] = derived
        if done:
            self._record_denoised(state, series_uid, done, start)

    def _record_denoised(
        self, state: SeriesState, series_uid: str, done: dict[str, list[str]], start: float
    ) -> None:
        self.spool.update(state.uid, denoised=done, derived_series_uid=series_uid)
        self.log(
            f"[ldct-node] series {state.uid}: {len(done)} instance(s) denoised in "
            f"{time.perf_counter() - start:.1f} s -> derived series {series_uid}"
        )
        # Last: without this line a restarted node denoises them again, into the same UIDs.
        self.spool.log("denoised", state.uid, derived_series=series_uid, instances=done)

    # -- forwarding -------------------------------------------------------------------------
    def _forward_loop(self) -> None:
        next_purge = 0.0
        while not self._stop.wait(0.2):
            now = time.monotonic()
            if now >= next_purge:
                next_purge = now + 60.0
                try:
                    purged = self.spool.purge(self.config.keep_hours * 3600.0)
                except (OSError, SpoolError) as exc:
                    purged = []
                    self.log(f"[ldct-node] purging forwarded series failed ({exc}); trying again in 60 s")
                if purged:
                    self.log(
                        f"[ldct-node] removed {len(purged)} series forwarded over {self.config.keep_hours:g} h ago"
                    )
            for state in self.spool.snapshot().values():
                if state.to_forward and not state.to_denoise and now >= state.next_forward:
                    self._guarded(self._forward, state)
                if self._stop.is_set():
                    return

    def _forward(self, state: SeriesState) -> None:
        sops = sorted(state.to_forward)
        files = [self.spool.out_path(state.uid, sop) for sop in sops]
        start = time.perf_counter()
        try:
            send(self.config.destination, files, self.config.ae_title)
        except (ForwardError, OSError) as exc:
            attempt = state.forward_attempts + 1
            delay = min(self.config.retry_max_s, self.config.retry_base_s * 2 ** (attempt - 1))
            self.spool.update(state.uid, forward_attempts=attempt, next_forward=time.monotonic() + delay)
            self.log(
                f"[ldct-node] series {state.uid}: forward to {self.config.destination} failed "
                f"(attempt {attempt}: {exc}); retrying in {delay:g} s, the series waits in the spool"
            )
            self.spool.log("forward_failed", state.uid, attempt=attempt, error=str(exc), retry_in_s=delay)
            return
        self.spool.update(
            state.uid, forwarded=set(sops), forward_attempts=0, next_forward=0.0, forwarded_at=time.time()
        )
        self.spool.log("forwarded", state.uid, destination=str(self.config.destination), instances=sops)
        self.log(
            f"[ldct-node] series {state.uid}: forwarded {len(sops)} instance(s) to "
            f"{self.config.destination} in {time.perf_counter() - start:.1f} s"
        )
