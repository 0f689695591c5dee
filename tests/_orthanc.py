"""A real Orthanc (Debian's 1.10 build, DICOMweb plugin) for the tests, run hermetically.

Each ``Orthanc`` lives in the workdir it is given: configuration, SQLite index, storage area and log,
nothing in ``$HOME`` or ``/var/lib/orthanc``. Ports are free ports of the moment; a start that loses
the race for one is retried on fresh ports.

Orthanc 1.10 cannot bind to an address: its HTTP server (civetweb, "HttpPort" only) and its DICOM
server (DCMTK's ``ASC_initializeNetwork`` with a bare port) both listen on 0.0.0.0. What can be
closed is closed: HTTP requests from other hosts are refused ("RemoteAccessAllowed": false), C-FIND,
C-MOVE and C-GET are only for declared modalities, and a Lua filter drops instances that arrive over
DICOM from anywhere but the loopback, so that nothing from the network lands in a test's archive.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

# Lua, not a plugin: built into Orthanc. It drops what arrives over DICOM from another host, though
# the sender still gets a success status (1.10 has no way to answer otherwise: its
# "ReceivedCStoreInstanceFilter" hook is inverted, a 0 from it drops the instance and anything else
# stores it, and the status sent is 0x0000 either way). REST uploads need no check here:
# RemoteAccessAllowed=false already answers other hosts with 401.
_LOOPBACK_ONLY_LUA = """\
function ReceivedInstanceFilter(dicom, origin, info)
  if origin["RequestOrigin"] ~= "DicomProtocol" then
    return true
  end
  local ip = origin["RemoteIp"]
  if ip == "127.0.0.1" or ip == "::1" or ip == "::ffff:127.0.0.1" then
    return true
  end
  print("dropped an instance C-STOREd from " .. tostring(ip))
  return false
end
"""


def installed() -> bool:
    """Whether Orthanc, the DICOMweb plugin and DCMTK's storescu are all on this machine."""
    return ORTHANC.is_file() and DICOMWEB_PLUGIN.exists() and shutil.which("storescu") is not None


def ensure_installed(repo_root: Path) -> None:
    """Installs Orthanc, its DICOMweb plugin and DCMTK with apt (scripts/install_dicom.sh) when one
    of them is missing: a fresh CI machine has none of them."""
    if installed():
        return
    script = repo_root / "scripts" / "install_dicom.sh"
    # Both xdist workers may find them missing at once, and one apt-get would fail on dpkg's lock.
    # The lock is the script's own (flock needs no write access): nothing is written for it.
    with open(script, "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not installed():
            subprocess.run(["bash", str(script)], check=True, timeout=900)
    if not installed():
        raise RuntimeError(
            f"scripts/install_dicom.sh ran, but {ORTHANC}, {DICOMWEB_PLUGIN} or storescu is still missing"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _lost_port_race(log: str) -> bool:
    # "The TCP port of the DICOM|HTTP server is privileged or already in use": another process took
    # a port between free_port() and Orthanc's bind.
    return "already in use" in log


class Orthanc:
    """A running Orthanc, as a context manager: started on enter, stopped (no process left) on exit.

    ``modalities`` maps a name to ``(AET, host, port)``, the remote DICOM nodes Orthanc may send to;
    more can be added while it runs (``add_modality``).
    """

    START_TIMEOUT = 30.0
    STOP_TIMEOUT = 15.0
    _START_TRIES = 3

    def __init__(
        self,
        workdir: Path,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        dicomweb: bool = True,
        dicom_port: int | None = None,
    ) -> None:
        """``dicom_port``: a port chosen beforehand (a destination that is down until Orthanc
        starts on it); free ports otherwise."""
        self.workdir = Path(workdir)
        self._fixed_dicom_port = dicom_port
        self._aet = aet
        self._modalities = dict(modalities or {})
        self._dicomweb = dicomweb
        self._http_port = 0
        self._dicom_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"
        # For the tests' own requests too (STOW-RS, QIDO-RS): no proxy from the environment may sit
        # between them and 127.0.0.1.
        self.http = requests.Session()
        self.http.trust_env = False
        self.startup_seconds = 0.0

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Orthanc:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _config(self) -> dict[str, Any]:
        storage = self.workdir / "storage"
        config: dict[str, Any] = {
            "Name": f"ldct-test-{self._aet}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self._http_port,
            "DicomPort": self._dicom_port,
            "DicomAet": self._aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            # Only what the tests use: no Explorer UI, no WebDAV, no metrics, no Lua over REST.
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "MetricsEnabled": False,
            "ExecuteLuaEnabled": False,
            "HttpCompressionEnabled": False,
            "HttpThreadsCount": 8,
            "DicomThreadsCount": 2,
            "ConcurrentJobs": 2,
            # Any calling AET may store or echo; the called AET is not checked (callers that get
            # the title wrong should still reach the test's Orthanc, the tests check titles themselves).
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {name: [a, host, port] for name, (a, host, port) in self._modalities.items()},
            "DicomModalitiesInDatabase": False,
            "OrthancPeers": {},
            # Every transfer syntax Orthanc knows; an unknown SOP class is still accepted, so that a
            # test sees its own assertion fail, not a rejected presentation context.
            "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
            "UnknownSopClassAccepted": True,
            # A dead peer fails a test in seconds, not in Orthanc's default minutes.
            "DicomScuTimeout": 10,
            "DicomScpTimeout": 10,
            "HttpTimeout": 10,
            "HttpRequestTimeout": 30,
            # The jobs behind synchronous /store calls must be kept until they are answered; none
            # survive a restart (each Orthanc here is new).
            "JobsHistorySize": 10,
            "SaveJobs": False,
            "SyncStorageArea": False,
            "StorageCompression": False,
            "OverwriteInstances": False,
            "StableAge": 2,
            "LuaScripts": [str(self.workdir / "loopback_only.lua")],
            "Plugins": [str(DICOMWEB_PLUGIN)] if self._dicomweb else [],
        }
        if self._dicomweb:
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}
        return config

    def start(self) -> None:
        """Writes the configuration, starts Orthanc and waits until its REST API answers."""
        if not ORTHANC.is_file():
            raise RuntimeError(f"{ORTHANC} is missing: run scripts/install_dicom.sh")
        if self._dicomweb and not DICOMWEB_PLUGIN.exists():
            raise RuntimeError(f"{DICOMWEB_PLUGIN} is missing: run scripts/install_dicom.sh")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "loopback_only.lua").write_text(_LOOPBACK_ONLY_LUA)
        for attempt in range(self._START_TRIES):
            self._http_port, self._dicom_port = free_port(), self._fixed_dicom_port or free_port()
            while self._dicom_port == self._http_port:
                self._http_port = free_port()
            self.config_path.write_text(json.dumps(self._config(), indent=2))
            t0 = time.monotonic()
            self._launch()
            if self._wait_ready():
                self.startup_seconds = time.monotonic() - t0
                return
            self.stop()
            log = self._log_since_launch()
            if attempt + 1 < self._START_TRIES and _lost_port_race(log):
                continue
            tail = "\n".join(log.splitlines()[-40:])
            raise RuntimeError(f"Orthanc did not start ({self.config_path}), its log:\n{tail}")

    def _launch(self) -> None:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        command = [str(ORTHANC), str(self.config_path)]
        # A test process that is killed (a timeout, a crashed xdist worker) runs no __exit__: the kernel
        # then sends Orthanc SIGTERM. setpriv (util-linux) sets that up without a preexec_fn, which
        # is unsafe in a process with threads (pynetdicom's). Start it from the thread that outlives it.
        if (setpriv := shutil.which("setpriv")) is not None:
            command = [setpriv, "--pdeathsig", "TERM", "--", *command]
        with open(self.log_path, "ab") as log:
            # A session of its own: a Ctrl-C in pytest reaches the tests, not Orthanc directly.
            self._process = subprocess.Popen(
                command,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Orthanc writes nothing to $HOME; should a library it loads ever do, it lands here.
                env={**os.environ, "HOME": str(self.workdir)},
            )

    def _log_since_launch(self) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def _wait_ready(self) -> bool:
        assert self._process is not None
        deadline = time.monotonic() + self.START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                if self.http.get(f"{self.http_url}/system", timeout=2).status_code == 200:
                    # The DICOM server starts before the HTTP one; check it rather than trust the order.
                    with socket.create_connection(("127.0.0.1", self._dicom_port), timeout=2):
                        return True
            except (requests.RequestException, OSError):
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """SIGTERM (Orthanc closes its index cleanly, in about 2 s), then SIGKILL if it hangs."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=self.STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # Only while the leader is unreaped is its group surely ours (the group, so that nothing
            # it might have spawned outlives it).
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    # ------------------------------------------------------------------ addresses

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self._http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    @property
    def dicom_port(self) -> int:
        return self._dicom_port

    @property
    def aet(self) -> str:
        return self._aet

    # ------------------------------------------------------------------ REST

    def _check(self, response: requests.Response, what: str) -> requests.Response:
        if response.status_code >= 400:
            raise RuntimeError(
                f"Orthanc {what}: HTTP {response.status_code}: {response.text[:2000]}\n"
                f"--- orthanc.log ---\n{self.log_tail()}"
            )
        return response

    def get_json(self, path: str, timeout: float = 30) -> Any:
        """GET on the REST API; an HTTP error raises with Orthanc's body and log."""
        return self._check(self.http.get(f"{self.http_url}{path}", timeout=timeout), f"GET {path}").json()

    def upload(self, data: bytes | Path) -> str:
        """POST /instances; the Orthanc ID of the instance. Orthanc answers a duplicate SOP Instance UID
        with 200 too ("Status": "AlreadyStored", the stored file kept), so this returns its ID."""
        body = data.read_bytes() if isinstance(data, Path) else data
        response = self.http.post(
            f"{self.http_url}/instances",
            data=body,
            headers={"Content-Type": "application/dicom"},
            timeout=60,
        )
        return self._check(response, "upload").json()["ID"]

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declares a DICOM node while Orthanc runs (kept in memory: "DicomModalitiesInDatabase" is
        false), for nodes whose port is only known once Orthanc is up."""
        response = self.http.put(
            f"{self.http_url}/modalities/{name}",
            json={"AET": aet, "Host": host, "Port": port},
            timeout=30,
        )
        self._check(response, f"PUT /modalities/{name}")
        self._modalities[name] = (aet, host, port)

    def store_to_modality(self, name: str, resources: list[str], timeout: float = 120) -> dict:
        """C-STORE of Orthanc resources (any level) to a modality, waiting for the job to end; its result
        (InstancesCount, FailedInstancesCount, ...). A refused instance (any non-success DIMSE status)
        or an unreachable node is HTTP 500, raised with Orthanc's explanation. ``timeout`` also bounds
        each DIMSE command ("Timeout")."""
        response = self.http.post(
            f"{self.http_url}/modalities/{name}/store",
            json={"Resources": resources, "Synchronous": True, "Timeout": max(1, int(timeout))},
            timeout=timeout + 10,
        )
        return self._check(response, f"store to {name}").json()

    def series(self) -> list[dict]:
        """Every series, each with its "ID", "MainDicomTags" and "Instances" (Orthanc IDs)."""
        return self.get_json("/series?expand")

    def instance_tags(self, instance_id: str) -> dict:
        """The instance's tags by keyword, as Orthanc 1.10 simplifies them: every value a string
        (numbers too, several values joined by a backslash), a sequence a list of such dicts (nested
        ones too), binary data (PixelData) and strings over 256 characters None. Private tags that
        DCMTK's dictionary knows get its names, and equal names overwrite one another
        ("PrivateCreator"): read private tags from ``instance_file`` instead."""
        return self.get_json(f"/instances/{instance_id}/tags?simplify")

    def find_instance(self, sop_uid: str) -> str:
        """The Orthanc ID of the instance with this SOPInstanceUID (POST /tools/lookup)."""
        response = self.http.post(f"{self.http_url}/tools/lookup", data=sop_uid, timeout=30)
        found = [r["ID"] for r in self._check(response, "lookup").json() if r.get("Type") == "Instance"]
        if not found:
            raise LookupError(f"Orthanc holds no instance {sop_uid}")
        return found[0]

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file as Orthanc stored it (for a REST upload or STOW, the very bytes sent)."""
        response = self.http.get(f"{self.http_url}/instances/{instance_id}/file", timeout=60)
        return self._check(response, f"GET instance {instance_id} file").content

    # ------------------------------------------------------------------ helpers

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Polls ``predicate`` until it returns something truthy (which is returned); Orthanc ingests
        and sends in the background, so the tests wait for effects instead of sleeping."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"timed out after {timeout:g} s waiting for {what}\n"
                    f"--- orthanc.log ---\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def log_tail(self, n: int = 40) -> str:
        """The end of orthanc.log, for failure messages."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no orthanc.log)"
        return "\n".join(lines[-n:])
