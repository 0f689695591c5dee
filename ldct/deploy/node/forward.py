"""Sending a derived series on: DICOM C-STORE to an AE, or DICOMweb STOW-RS to a URL."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from ldct.errors import LdctError

# Statuses a C-STORE SCP answers with when it kept the instance (0xB000, 0xB006, 0xB007: stored
# with coercion or elements discarded; PS3.4 B.2.3).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}
_AE_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")
STOW_BATCH = 32


class ForwardError(LdctError, ConnectionError):
    """The destination did not take the series (it stays in the spool and is retried)."""


@dataclass(frozen=True)
class Destination:
    """Where derived series go: ``AET@HOST:PORT`` (C-STORE) or a DICOMweb base URL (STOW-RS)."""

    aet: str = ""
    host: str = ""
    port: int = 0
    url: str = ""

    @classmethod
    def parse_ae(cls, text: str) -> Destination:
        match = _AE_RE.match(text.strip())
        if not match or not 0 < int(match["port"]) < 65536:
            raise ValueError(
                f"--forward {text!r}: expected AET@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242 "
                "(AE title at most 16 characters)"
            )
        return cls(aet=match["aet"], host=match["host"], port=int(match["port"]))

    @classmethod
    def parse_url(cls, text: str) -> Destination:
        if not re.match(r"^https?://[^/\s]+", text):
            raise ValueError(
                f"--forward-dicomweb {text!r}: expected an http(s) URL, e.g. http://pacs:8042/dicom-web"
            )
        return cls(url=text.rstrip("/"))

    def __str__(self) -> str:
        return f"STOW-RS {self.url}" if self.url else f"{self.aet}@{self.host}:{self.port}"


def send(destination: Destination, files: Sequence[Path], calling_aet: str, timeout: float = 30.0) -> None:
    """Send every file, or raise :class:`ForwardError` naming the first that was not taken."""
    if not files:
        return
    if destination.url:
        _stow(destination.url, files, timeout)
    else:
        _c_store(destination, files, calling_aet, timeout)


def _c_store(dest: Destination, files: Sequence[Path], calling_aet: str, timeout: float) -> None:
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        for syntax in sorted({str(ds.file_meta.TransferSyntaxUID) for ds in datasets}):
            ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.aet)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise ForwardError(f"association with {dest} {reason} (is it up, and does it know AE {calling_aet}?)")
    try:
        for path, ds in zip(files, datasets, strict=True):
            status = assoc.send_c_store(ds)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code not in _STORED:
                raise ForwardError(
                    f"{dest} did not store {path.name} (C-STORE status "
                    f"{'none: connection lost or timed out' if code < 0 else hex(code)})"
                )
    finally:
        if assoc.is_established:
            assoc.release()


def _stow(url: str, files: Sequence[Path], timeout: float) -> None:
    import requests

    for start in range(0, len(files), STOW_BATCH):
        batch = files[start : start + STOW_BATCH]
        boundary = uuid.uuid4().hex
        body = (
            b"".join(
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                + Path(f).read_bytes()
                + b"\r\n"
                for f in batch
            )
            + f"--{boundary}--\r\n".encode()
        )
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        try:
            response = requests.post(f"{url}/studies", data=body, headers=headers, timeout=timeout)
        except requests.RequestException as exc:
            raise ForwardError(f"STOW-RS to {url} failed ({type(exc).__name__}: {exc})") from exc
        if response.status_code != 200:
            raise ForwardError(
                f"STOW-RS to {url} answered HTTP {response.status_code} "
                f"(200 means every instance was stored): {response.text[:300]}"
            )
