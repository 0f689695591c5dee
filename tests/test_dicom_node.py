"""`ldct-best listen`: the DICOM node against a real Orthanc (Debian's), over 127.0.0.1 only.

Orthanc pushes a simulated low-dose series to the node (its REST "store to modality", a real
C-STORE); the node denoises it with a registered model and sends the derived series back to
Orthanc. Around it: two series at once, a compressed series, an MR instance and a corrupt CT
instance refused with their DIMSE statuses, the node killed with SIGKILL mid-series and while a
forward was pending, the destination down then up, a resent series not duplicated, STOW-RS,
a full disk and an oversized series.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from _orthanc import Orthanc, ensure_installed, free_port
from _registry import register_smoke
from pydicom.uid import JPEG2000Lossless, generate_uid

from ldct.data.phantoms import make_phantom
from ldct.data.simulate import simulate_low_dose
from ldct.data.writer import write_ct_slice
from ldct.deploy.denoise import denoise_series
from ldct.tracking import store as tracking_store

ROOT = Path(__file__).resolve().parents[1]
LDCT_BEST = str(Path(sys.executable).parent / "ldct-best")
NODE_AET = "LDCTNODE"
SIZE = 64


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> tuple[str, str]:
    """(tracking URI, version) of a smoke generator, and the DICOM tools installed."""
    ensure_installed(ROOT)
    uri, version, _ = register_smoke(tmp_path_factory.mktemp("registry"), study="node")
    return uri, version


def _low_dose_series(
    out: Path, n: int, seed: int, study_uid: str | None = None, compress: str | None = None
) -> list[Path]:
    """A simulated quarter-dose series: phantom anatomy through the project's CT simulator."""
    rng = np.random.default_rng(seed)
    study_uid, series_uid, frame_uid = study_uid or generate_uid(), generate_uid(), generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        anatomy = make_phantom(SIZE, rng, pixel_size_mm=5.0, z_mm=2.0 * i)
        low = simulate_low_dose(anatomy, 0.25, rng, pixel_size_mm=5.0, noise_free=True)
        path = out / f"{i:03d}.dcm"
        write_ct_slice(
            path,
            low,
            patient=f"NODE-{seed}",
            study_uid=study_uid,
            series_uid=series_uid,
            frame_uid=frame_uid,
            sop_uid=generate_uid(),
            series_description=f"quarter dose {seed}",
            series_number=3,
            instance=i + 1,
            position=(0.0, 0.0, 2.0 * i),
            spacing=(5.0, 5.0),
            thickness=2.0,
        )
        if compress:
            ds = pydicom.dcmread(path)
            ds.compress(compress, generate_instance_uid=False)
            ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _scu(port: int, datasets: list[pydicom.Dataset], calling: str = "MODALITY") -> list[int]:
    """C-STORE each dataset in one association; the status of each (association kept)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established, "the node did not accept the association"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _echo(port: int) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    if not assoc.is_established:
        return False
    try:
        return int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


class Node:
    """`ldct-best listen` as a subprocess; SIGKILL-able; its log kept in the test's directory."""

    def __init__(self, store: Path, forward: list[str], uri: str, port: int | None = None, idle: float = 1.0):
        self.store, self.port = store, port or free_port()
        self.log_path = store.parent / f"node-{self.port}-{time.monotonic_ns()}.log"
        self.args = [
            LDCT_BEST, "--tracking-uri", uri, "listen", "--ae-title", NODE_AET, "--port", str(self.port), "--store", str(store),
            "--idle", str(idle), "--retry-base", "0.5", "--retry-max", "1", "--alias", "candidate",
            *forward,
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Node:
        self.log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while not _echo(self.port):
            assert self.proc.poll() is None, f"the node exited:\n{self.text()}"
            assert time.monotonic() < deadline, f"the node never answered C-ECHO:\n{self.text()}"
            time.sleep(0.3)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, kind: str) -> list[dict]:
        path = self.store / "journal.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [e for e in map(json.loads, lines) if e["event"] == kind]


def _derived(orthanc: Orthanc, source_series: str, n: int, what: str) -> list[dict]:
    """The tags of the n instances of the series derived from ``source_series``, once all arrived."""

    def found():
        for series in orthanc.series():
            if series["MainDicomTags"].get("SeriesDescription", "").endswith("[ldct denoised]"):
                tags = [orthanc.instance_tags(i) for i in series["Instances"]]
                sources = {t["SourceImageSequence"][0]["ReferencedSOPInstanceUID"] for t in tags}
                if sources and sources <= _SOURCES[source_series] and len(tags) >= n:
                    return tags
        return None

    return orthanc.wait_for(found, timeout=120, what=what)


_SOURCES: dict[str, set[str]] = {}


def _upload(orthanc: Orthanc, paths: list[Path]) -> tuple[str, str]:
    """Upload a series into Orthanc: (Orthanc series ID, SeriesInstanceUID)."""
    ids = [orthanc.upload(p) for p in paths]
    uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    _SOURCES[uid] = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    series_id = next(s["ID"] for s in orthanc.series() if s["MainDicomTags"]["SeriesInstanceUID"] == uid)
    assert len(ids) == len(paths)
    return series_id, uid


def test_orthanc_pushes_two_series_and_gets_the_derived_series_back(registered, tmp_path):
    uri, version = registered
    node_port = free_port()
    with Orthanc(tmp_path / "orthanc", modalities={"LDCT": (NODE_AET, "127.0.0.1", node_port)}) as pacs:
        study = generate_uid()
        plain = _low_dose_series(tmp_path / "a", 3, seed=1, study_uid=study)
        j2k = _low_dose_series(tmp_path / "b", 2, seed=2, compress=JPEG2000Lossless)
        (id_a, uid_a), (id_b, uid_b) = _upload(pacs, plain), _upload(pacs, j2k)
        forward = ["--forward", f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}"]
        # As if `ldct-best validate` had promoted onnxruntime: the node must run that path (an
        # export into its store), not torch. The tag goes once the node has read it.
        registry = tracking_store.client(uri)
        registry.set_model_version_tag("ldct-denoiser", version, "fps_backend", "onnxruntime")
        try:
            with Node(tmp_path / "spool", forward, uri, port=node_port) as node:
                registry.delete_model_version_tag("ldct-denoiser", version, "fps_backend")
                # Both series at once, each by Orthanc's own C-STORE (its REST "store to modality").
                threads = [
                    threading.Thread(target=pacs.store_to_modality, args=("LDCT", [i])) for i in (id_a, id_b)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                tags_a = _derived(pacs, uid_a, 3, "the derived series of A in Orthanc")
                tags_b = _derived(pacs, uid_b, 2, "the derived series of the JPEG 2000 series in Orthanc")
                source = pydicom.dcmread(plain[0])
                arrived = pydicom.dcmread(
                    io.BytesIO(pacs.instance_file(_instance_from(pacs, tags_a, source)))
                )
                log = node.text()
        finally:
            if "fps_backend" in registry.get_model_version("ldct-denoiser", version).tags:
                registry.delete_model_version_tag("ldct-denoiser", version, "fps_backend")

    assert len(tags_a) == 3 and len(tags_b) == 2, log
    assert "on onnxruntime" in log and (tmp_path / "spool" / "models").is_dir(), log
    for tags in (tags_a, tags_b):
        assert len({t["SeriesInstanceUID"] for t in tags}) == 1
        assert {t["SeriesInstanceUID"] for t in tags}.isdisjoint({uid_a, uid_b})
        assert not {t["SOPInstanceUID"] for t in tags} & set().union(*_SOURCES.values())
        for t in tags:
            assert t["ImageType"].split("\\")[:2] == ["DERIVED", "SECONDARY"]
            assert "denoised by ldct" in t["DerivationDescription"]
            assert t["SeriesDescription"].endswith("[ldct denoised]")
            equipment = t["ContributingEquipmentSequence"][-1]
            assert equipment["Manufacturer"] == "ldct"
            assert equipment["ManufacturerModelName"] == f"ldct-denoiser v{version}"
            assert equipment["SoftwareVersions"].startswith("ldct ")
            assert equipment["DeviceUID"] == t["DeviceUID"]
    assert {t["StudyInstanceUID"] for t in tags_a} == {study}
    # One DeviceUID for the registered version, on both series.
    assert len({t["DeviceUID"] for t in tags_a + tags_b}) == 1

    # Its pixels are what `ldct-best denoise` makes of the same slice with the same model.
    from ldct.registry.load import load_registered

    generator, meta = load_registered(alias="candidate", tracking_uri=uri)
    folder = tmp_path / "folder-in"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(plain[0].read_bytes())
    report = denoise_series(folder, tmp_path / "folder-out", generator=generator, meta=meta, progress=False)
    expected = pydicom.dcmread(report["written"][0])
    hu = arrived.pixel_array * float(arrived.RescaleSlope) + float(arrived.RescaleIntercept)
    hu_expected = expected.pixel_array * float(expected.RescaleSlope) + float(expected.RescaleIntercept)
    assert np.abs(hu - hu_expected).max() <= float(arrived.RescaleSlope)  # one quantisation step
    assert np.abs(hu - source.pixel_array.astype(float) - float(source.RescaleIntercept)).max() > 1


def _instance_from(pacs: Orthanc, tags: list[dict], source: pydicom.Dataset) -> str:
    sop = next(
        t["SOPInstanceUID"]
        for t in tags
        if t["SourceImageSequence"][0]["ReferencedSOPInstanceUID"] == source.SOPInstanceUID
    )
    return pacs.find_instance(sop)


def test_killed_mid_series_and_destination_down_then_up_forwards_everything_once(registered, tmp_path):
    uri, _ = registered
    pacs_port = free_port()  # nothing listens here until Orthanc starts on it (the destination is down)
    forward = ["--forward", f"ORTHANC@127.0.0.1:{pacs_port}"]
    paths = _low_dose_series(tmp_path / "s", 4, seed=3)
    datasets = [pydicom.dcmread(p) for p in paths]
    spool = tmp_path / "spool"

    # 1. Killed mid-series: two of four instances received (acknowledged), then SIGKILL.
    with Node(spool, forward, uri, idle=30) as node:
        assert _scu(node.port, datasets[:2]) == [0, 0]
        node.kill()
    # 2. Restarted: the rest arrives, the first two are sent again by the modality; the series is
    # denoised, but the destination is down: the forward fails and is retried, then SIGKILL again.
    with Node(spool, forward, uri, idle=1) as node:
        assert _scu(node.port, datasets) == [0, 0, 0, 0]
        _wait(lambda: node.events("forward_failed"), "a failed forward in the journal", node)
        node.kill()
    received = [e["sop"] for e in node.events("received")]
    assert sorted(received) == sorted(str(ds.SOPInstanceUID) for ds in datasets)  # no instance twice
    denoised = node.events("denoised")
    assert sum(len(e["instances"]) for e in denoised) == 4 and not node.events("forwarded")

    # 3. Restarted with the destination still down: it resumes the pending forward by itself...
    with Node(spool, forward, uri, idle=1) as node:
        before = len(node.events("forward_failed"))
        _wait(lambda: len(node.events("forward_failed")) > before, "the restarted node retrying", node)
        # ...and once the destination is up, the retry delivers the series.
        with Orthanc(tmp_path / "orthanc", dicom_port=pacs_port) as pacs:
            uid = str(datasets[0].SeriesInstanceUID)
            _SOURCES[uid] = {str(ds.SOPInstanceUID) for ds in datasets}
            tags = _derived(pacs, uid, 4, "the series forwarded after the destination came up")
            _wait(lambda: node.events("forwarded"), "the forward in the journal", node)
            # 4. The modality sends the whole series once more: nothing new is stored or sent.
            assert _scu(node.port, datasets) == [0, 0, 0, 0]
            time.sleep(2.5)  # > idle + a retry: a duplicate would have been denoised and sent by now
            assert len(node.events("received")) == 4 and len(node.events("forwarded")) == 1
            derived_series = [
                s
                for s in pacs.series()
                if s["MainDicomTags"]["SeriesInstanceUID"] == tags[0]["SeriesInstanceUID"]
            ]
            assert len(derived_series) == 1 and len(derived_series[0]["Instances"]) == 4
            log = node.text()
    assert "resuming 1 series" in log and "retrying in" in log, log


def _wait(predicate, what: str, node: Node, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert node.proc is not None and node.proc.poll() is None, f"the node exited:\n{node.text()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{node.text()}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def model(registered):
    """The registered smoke model as the node runs it in-process (no process start per test)."""
    from ldct.deploy.denoise import load_denoiser
    from ldct.deploy.node import ModelIdentity
    from ldct.registry.load import load_registered

    generator, meta = load_registered(alias="candidate", tracking_uri=registered[0])
    meta["registered_model"] = "ldct-denoiser"
    return load_denoiser(generator=generator, meta=meta), ModelIdentity.of(meta)


class InProcess:
    """A DicomNode in this process, with its log lines collected."""

    def __init__(self, model, store: Path, destination, **limits) -> None:
        from ldct.deploy.node import DicomNode, NodeConfig

        self.lines: list[str] = []
        config = NodeConfig(
            ae_title=NODE_AET, port=free_port(), destination=destination, store=store, idle_s=0.5,
            retry_base_s=0.5, retry_max_s=1.0, **limits,
        )  # fmt: skip
        self.node = DicomNode(config, model[0], model[1], log=self.lines.append)
        self.port = config.port

    def __enter__(self) -> InProcess:
        self.node.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.node.stop()

    def events(self, kind: str) -> list[dict]:
        return [e for e in self.node.spool.events() if e["event"] == kind]


def test_mr_and_corrupt_instances_are_refused_and_the_series_goes_on_by_stow_rs(model, tmp_path):
    from ldct.deploy.node import Destination

    paths = _low_dose_series(tmp_path / "s", 3, seed=4)
    good = [pydicom.dcmread(p) for p in paths]
    corrupt = pydicom.dcmread(paths[1])
    corrupt.SOPInstanceUID = generate_uid()
    corrupt.PixelData = corrupt.PixelData[: len(corrupt.PixelData) // 3]  # truncated pixel data
    mr = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
    scout = pydicom.dcmread(paths[2])  # a localizer in the series: kept, acknowledged, not denoised
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    with Orthanc(tmp_path / "orthanc") as pacs:
        with InProcess(model, tmp_path / "spool", Destination.parse_url(pacs.dicomweb_url)) as node:
            # One association: MR refused (0x0122), corrupt CT cannot be understood (0xC000), and
            # the association stays usable for the good instances around them.
            statuses = _scu(node.port, [good[0], mr, corrupt, good[1], good[2], scout])
            assert statuses == [0x0000, 0x0122, 0xC000, 0x0000, 0x0000, 0x0000], node.lines
            uid = str(good[0].SeriesInstanceUID)
            _SOURCES[uid] = {str(ds.SOPInstanceUID) for ds in good}
            tags = _derived(pacs, uid, 3, "the good instances' derived series, by STOW-RS")
    assert len(tags) == 3
    assert any(str(corrupt.SOPInstanceUID) in line and "cannot be decoded" in line for line in node.lines), (
        node.lines
    )
    assert any("MR Image Storage" in line and "0x0122" in line for line in node.lines), node.lines
    assert [e["destination"] for e in node.events("forwarded")] == [f"STOW-RS {pacs.dicomweb_url}"]
    refused = {e["sop"]: e["reason"] for e in node.events("refused")}
    assert list(refused) == [str(scout.SOPInstanceUID)] and "localizer" in refused[str(scout.SOPInstanceUID)]


def test_full_disk_and_oversized_series_are_clear_refusals(model, tmp_path):
    from ldct.deploy.node import Destination

    datasets = [pydicom.dcmread(p) for p in _low_dose_series(tmp_path / "s", 3, seed=5)]
    other = [pydicom.dcmread(p) for p in _low_dose_series(tmp_path / "t", 1, seed=6)]
    nowhere = Destination.parse_ae(f"NOBODY@127.0.0.1:{free_port()}")
    with InProcess(model, tmp_path / "spool-a", nowhere, max_series_instances=2) as node:
        assert _scu(node.port, datasets + other) == [0, 0, 0xA700, 0]
    assert any("would exceed 2 instances" in line and "--max-series-instances" in line for line in node.lines)

    # A real full disk: a 1 MiB tmpfs as the store (each instance is ~9 kB; the journal too).
    store = tmp_path / "tiny"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(store)], check=True)
    try:
        filler = store / "filler"
        with open(filler, "wb") as fh:
            fh.write(b"\0" * (1024 * 1024 - 40 * 1024))
        with InProcess(model, store, nowhere, min_free_mb=0.0) as node:
            statuses = _scu(
                node.port, [pydicom.dcmread(p) for p in _low_dose_series(tmp_path / "u", 8, seed=7)]
            )
            assert statuses[0] == 0 and 0xA700 in statuses, (statuses, node.lines)
            kept = sorted(p.stem for p in store.glob("series/*/in/*.dcm"))
        assert not list(store.glob("tmp/*")), "a refused instance left a partial file"
        assert any("is full" in line or "No space left" in line for line in node.lines), node.lines
        assert len(kept) == statuses.count(0)  # every acknowledged instance is on disk
    finally:
        subprocess.run(["umount", str(store)], check=True)


def test_an_enhanced_ct_becomes_one_derived_slice_per_frame(model, tmp_path):
    from ldct.deploy.node import Destination

    ect = pydicom.dcmread(pydicom.data.get_testdata_file("eCT_Supplemental.dcm"))
    with Orthanc(tmp_path / "orthanc") as pacs:
        with InProcess(
            model, tmp_path / "spool", Destination.parse_ae(f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}")
        ) as node:
            assert _scu(node.port, [ect]) == [0], node.lines
            _SOURCES[str(ect.SeriesInstanceUID)] = {str(ect.SOPInstanceUID)}
            tags = _derived(pacs, str(ect.SeriesInstanceUID), 2, "the Enhanced CT's derived slices")
    assert sorted(t["SourceImageSequence"][0]["ReferencedFrameNumber"] for t in tags) == ["1", "2"]
    assert {t["SOPClassUID"] for t in tags} == {"1.2.840.10008.5.1.4.1.1.2"}  # CT Image Storage
    assert {t["StudyInstanceUID"] for t in tags} == {str(ect.StudyInstanceUID)}


def test_spool_recovers_from_its_files_and_a_torn_journal(tmp_path):
    from ldct.deploy.node import Spool, SpoolError

    spool = Spool(tmp_path / "s")
    assert spool.store("1.2.3", "1.2.3.4", "1.2", b"a" * 100) is True
    assert spool.store("1.2.3", "1.2.3.4", "1.2", b"a" * 100) is False  # resent: stored once
    assert spool.store("1.2.3", "1.2.3.5", "1.2", b"b" * 100) is True
    spool.log("denoised", "1.2.3", derived_series="9.9", instances={"1.2.3.4": ["9.9.1"]})
    spool.write_derived("1.2.3", "9.9.1", lambda p: p.write_bytes(b"derived"))
    spool.close()
    with open(tmp_path / "s" / "journal.jsonl", "a") as fh:
        fh.write('{"t": 1, "event": "forwar')  # the crash tore the last line
    (tmp_path / "s" / "tmp" / "x.part").write_bytes(b"partial")
    # A file that arrived just before a crash that took its journal line with it:
    (tmp_path / "s" / "series" / "1.2.3" / "in" / "1.2.3.6.dcm").write_bytes(b"c")

    again = Spool(tmp_path / "s")
    state = again.series["1.2.3"]
    assert state.received == {"1.2.3.4", "1.2.3.5", "1.2.3.6"}
    assert state.denoised == {"1.2.3.4": ["9.9.1"]} and state.to_forward == {"9.9.1"}
    assert state.to_denoise == {"1.2.3.5", "1.2.3.6"} and state.state == "received"
    assert not list((tmp_path / "s" / "tmp").iterdir())
    again.log("forwarded", "1.2.3", instances=["9.9.1"])  # starts on a line of its own
    assert [e["event"] for e in again.events()][-1] == "forwarded"
    for bad in ("../../etc", "1.2.x", "", "1" * 65):
        with pytest.raises(SpoolError, match="is not a DICOM UID"):
            again.store(bad, "1.2.3.7", "1.2", b"x")
    again.close()


def test_model_identity_and_derived_uids_are_stable_and_distinct():
    from ldct.deploy.node import ModelIdentity
    from ldct.deploy.node.derive import derived_series_uid, derived_sop_uid

    v1 = ModelIdentity.of({"version": "1", "run_id": "abc"})
    assert v1 == ModelIdentity.of({"version": "1", "run_id": "abc"}) and v1.name == "ldct-denoiser v1"
    others = {
        ModelIdentity.of({"version": "2", "run_id": "abc"}),
        ModelIdentity.of({"version": "1", "run_id": "xyz"}),
    }
    assert v1.device_uid not in {m.device_uid for m in others}
    uids = [
        v1.device_uid,
        derived_series_uid("1.2.3", v1),
        derived_sop_uid("1.2.3.4", None, v1),
        derived_sop_uid("1.2.3.4", 0, v1),
    ]
    assert len(set(uids)) == 4 and all(len(u) <= 64 and set(u) <= set("0123456789.") for u in uids)
    assert derived_sop_uid("1.2.3.4", None, v1) == derived_sop_uid(
        "1.2.3.4", None, ModelIdentity.of({"version": "1", "run_id": "abc"})
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ORTHANC", "expected AET@HOST:PORT"),
        ("A@h:0", "expected AET@HOST:PORT"),
        ("A" * 17 + "@h:104", "at most 16"),
    ],
)
def test_bad_forward_destinations_are_named(text, message):
    from ldct.deploy.node import Destination

    with pytest.raises(ValueError, match=message):
        Destination.parse_ae(text)
    assert str(Destination.parse_ae("ORTHANC@127.0.0.1:4242")) == "ORTHANC@127.0.0.1:4242"
    with pytest.raises(ValueError, match="expected an http"):
        Destination.parse_url("pacs:8042/dicom-web")


def test_forwarded_series_are_purged_after_their_keep_time_and_nothing_pending_is(tmp_path):
    from ldct.deploy.node import Spool

    spool = Spool(tmp_path / "s")
    for series in ("1.1", "2.2"):
        spool.store(series, f"{series}.1", "9", b"x")
        spool.write_derived(series, f"{series}.9", lambda p: p.write_bytes(b"d"))
        spool.update(series, denoised={f"{series}.1": [f"{series}.9"]})
    spool.update("1.1", forwarded={"1.1.9"}, forwarded_at=time.time() - 7200)  # forwarded 2 h ago
    spool.log("forwarded", "1.1", instances=["1.1.9"])
    assert spool.purge(older_than_s=3 * 3600) == []  # kept for 3 h
    assert spool.purge(older_than_s=3600) == ["1.1"]  # "2.2" waits for its forward: never purged
    assert not (tmp_path / "s" / "series" / "1.1").exists() and (tmp_path / "s" / "series" / "2.2").exists()
    assert [e["event"] for e in spool.events()][-1] == "purged"
    spool.close()
    assert set(Spool(tmp_path / "s").series) == {"2.2"}
