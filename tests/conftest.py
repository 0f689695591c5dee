"""Shared fixtures: DICOM trees written with pydicom (Mayo and TCIA layouts), a small built-in set.

The DICOM writer here is deliberately independent of ``ldct.data.simulate.write_ct_slice``: the
reader is tested against files it did not produce itself.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from _ray_fixtures import mlflow_server, ray_local  # noqa: F401  (shared Ray/MLflow fixtures)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# --------------------------------------------------------------------------- hermetic session
# LDCT_HOME points at a temporary directory for the whole session (subprocesses and Ray workers
# inherit it), and the session fails if the repository tree or ~/.cache/ldct changed during it.

REPO = Path(__file__).resolve().parents[1]
USER_CACHE = Path.home() / ".cache" / "ldct"
# Written by the tools themselves, not by the code under test.
_IGNORED_PARTS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".venv"}
# One LDCT_HOME per session, shared by the xdist workers (they inherit the controller's
# environment, and the controller imports this file before it starts them): the built-in sets and
# the BM3D cache are made once, not once per worker; cache.py's lock serialises their makers.
_SESSION_HOME_VAR = "LDCT_TEST_SESSION_HOME"
_inherited = os.environ.get(_SESSION_HOME_VAR, "")
_OWNS_HOME = not (os.environ.get("PYTEST_XDIST_WORKER") and _inherited and Path(_inherited).is_dir())
_LDCT_HOME = tempfile.mkdtemp(prefix="ldct-home-") if _OWNS_HOME else _inherited
os.environ[_SESSION_HOME_VAR] = os.environ["LDCT_HOME"] = _LDCT_HOME
# Ray's first local start on a machine writes a token to ~/.ray/auth_token; a token of the
# session's own, in the environment every Ray process inherits, keeps it out of $HOME.
RAY_HOME = Path.home() / ".ray"
# What the session must leave as it found it.
_WATCHED = (("repo", REPO), ("cache", USER_CACHE), ("ray", RAY_HOME))
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _IGNORED_PARTS and not d.endswith(".egg-info")]
        for name in filenames + dirnames:
            path = Path(dirpath) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            out[str(path.relative_to(root))] = (st.st_size if path.is_file() else -1, st.st_mtime_ns)
    return out


def _changes(before: dict, after: dict) -> list[str]:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k] and before[k][0] != -1)
    return [f"+ {k}" for k in added] + [f"- {k}" for k in removed] + [f"~ {k}" for k in changed]


_BEFORE: dict[str, dict] = {}

# --------------------------------------------------------------------------- parallel, not Ray
# The suite runs on 2 xdist workers (pyproject's addopts). Everything that starts a Ray of this
# machine's (the session's ray_local, a study or `ldct train --workers N` in a subprocess) runs in
# ONE scope, on one worker, one test at a time: two such studies at once on 2 cores starve each
# other's worker groups until Train V2 times them out. The other worker starts with the `ray up`
# cluster test, whose Ray lives in a PID namespace of its own, and takes the rest after it, a
# module at a time (module fixtures such as test_evaluate's checkpoint are built once). Beside a
# second Ray, a local Ray's State API must be pinned (ldct.cluster.init_ray, docs/DESIGN.md §5a), or
# Train V2's placement-group cleaner fails with "Found multiple active Ray instances".
# A scheduler of our own, not `--dist loadgroup`: xdist 3.8 marks a group by rewriting
# `item._nodeid`, which pytest 9's nodeid property no longer reads, so its groups are lost.
RAY_MODULES = {
    "test_cluster", "test_faults", "test_pareto", "test_repeat", "test_study", "test_tracking", "test_train",
}  # fmt: skip
# Studies in a subprocess with a Ray of their own (own RAY_TMPDIR, pinned State API): they run
# beside the session's Ray, on the other worker, so that the Ray scope is not the whole suite.
OWN_RAY_TESTS = {
    "tests/test_cluster.py::test_study_on_s3_storage_keeps_checkpoints_in_the_bucket",
    "tests/test_study.py::test_stopped_study_resumes_without_repeating_a_trial",
}
# Longest first (measured in the full suite, seconds): the Ray scope (~650) on one worker; the
# own-Ray studies (~200), then the heavy modules on the other; the rest,
# a module at a time, wherever a worker is free, so that the tail is short modules and neither
# worker idles while the other finishes a long one. A module not listed simply goes after these.
FIRST_SCOPES = (
    "ray", "own-ray",
    "tests/test_evaluate.py", "tests/test_validate_cli.py", "tests/test_serve.py", "tests/test_best_cli.py",
    "tests/test_packaging.py", "tests/test_deploy.py", "tests/test_engine.py", "tests/test_backends.py",
)  # fmt: skip
# Ray Train gives a worker group 60 s to start; on a loaded 2-core machine importing torch/timm
# in a fresh worker took longer and failed trials at random. Every Ray the suite starts (the
# session's, a study's in a subprocess) inherits this.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "240")


def _scope(nodeid: str) -> str:
    if nodeid in OWN_RAY_TESTS:
        return "own-ray"
    module = nodeid.split("::", 1)[0]
    return "ray" if Path(module).stem in RAY_MODULES else module


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    # Scopes in the collection's order (pytest_collection_modifyitems puts FIRST_SCOPES first),
    # not xdist's default of most tests first, which would start the cluster test last.
    config.option.loadscopereorder = False

    class RayScopeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return RayScopeScheduling(config, log)


@pytest.fixture(autouse=True)
def _one_thread_beside_ray(request, monkeypatch):
    """Tests outside the Ray scope get one torch/OpenMP thread, so the Ray chain (the suite's
    critical path) always has a core of its own on a 2-core machine."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None or _scope(request.node.nodeid) == "ray":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the subprocesses a test starts
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {scope: i for i, scope in enumerate(FIRST_SCOPES)}
    items.sort(key=lambda item: rank.get(_scope(item.nodeid), len(rank)))  # stable: file order kept
    stray = [i.nodeid for i in items if "ray_local" in i.fixturenames and _scope(i.nodeid) != "ray"]
    if stray:
        raise pytest.UsageError(
            f"{stray[:3]} use Ray outside tests/conftest.py's RAY_MODULES: add their module there, "
            "or two Ray instances will run at once on the two xdist workers"
        )


def pytest_sessionstart(session) -> None:
    for name, root in _WATCHED:
        _BEFORE[name] = _snapshot(root)


def pytest_sessionfinish(session, exitstatus) -> None:
    import shutil

    problems = []
    for name, root in _WATCHED:
        diff = _changes(_BEFORE.get(name, {}), _snapshot(root))
        if diff:
            problems.append(
                f"{root} changed during the test session (tests must be hermetic):\n  "
                + "\n  ".join(diff[:20])
            )
    if _OWNS_HOME:
        shutil.rmtree(_LDCT_HOME, ignore_errors=True)
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for p in problems:
            if reporter is not None:
                reporter.write_line(p, red=True)
        session.exitstatus = 1


# Small built-in set used by the data tests: seconds to make, same code path as the real one.
BUILTIN_SMALL = {"phantoms": 2, "slices": 2, "size": 64, "seed": 0, "dose": 0.25}


def ct_image(seed: int, size: int = 16) -> np.ndarray:
    """A deterministic HU image: a bright disc in soft tissue, air corners, some noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2.0
    img = np.where(xx**2 + yy**2 < (size / 2.0) ** 2, 40.0, -1000.0)
    img[xx**2 + yy**2 < (size / 6.0) ** 2] = 700.0
    return (img + rng.normal(0, 10, img.shape)).round()


def write_dicom(
    path: Path,
    hu: np.ndarray | None = None,
    *,
    patient: str = "P1",
    description: str = "Full Dose Images",
    z: float | None = 0.0,
    instance: int | None = 1,
    spacing: Iterable[float] = (0.7, 0.7),
    modality: str = "CT",
    rescale: bool = True,
    series_uid: str | None = None,
    study_uid: str | None = None,
    transfer_syntax: str | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
) -> Path:
    """One single-frame image file. ``transfer_syntax`` set to a compressed UID writes dummy
    encapsulated bytes that no decoder can turn into pixels."""
    hu = ct_image(0) if hu is None else np.asarray(hu, dtype=np.float64)
    stored = np.rint((hu - intercept) / slope).astype("<i2")
    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.Modality = modality
    ds.PatientID = patient
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesDescription = description
    if instance is not None:
        ds.InstanceNumber = instance
    if z is not None:
        ds.ImagePositionPatient = [-10.0, -10.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = 3
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if rescale:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    if transfer_syntax:
        ds.PixelData = encapsulate([b"\x00\x01\x02\x03" * 16])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_mayo_tree(
    root: Path, patients: dict[str, int], size: int = 16, thickness: str = "3mm", seed: int = 0
) -> dict[str, dict[float, tuple[Path, Path]]]:
    """``root/<patient>/{full,quarter}_<t>/<n>.IMA``; file names shuffled against z so that
    pairing really goes by position. Returns {patient: {z: (low path, full path)}}."""
    out: dict[str, dict[float, tuple[Path, Path]]] = {}
    for pi, (patient, n) in enumerate(sorted(patients.items())):
        study = generate_uid()
        series = {"full": generate_uid(), "quarter": generate_uid()}
        out[patient] = {}
        for i in range(n):
            z = -100.0 + 3.0 * i
            full = ct_image(1000 * pi + i + seed, size)
            low = full + np.random.default_rng(7 + i + seed).normal(0, 20, full.shape).round()
            name = f"{(i * 7) % n + 1:04d}.IMA"  # not in z order
            paths = []
            for kind, img, desc in (("quarter", low, "Quarter Dose"), ("full", full, "Full Dose")):
                paths.append(
                    write_dicom(
                        root / patient / f"{kind}_{thickness}" / name,
                        img,
                        patient=patient,
                        description=desc,
                        z=z,
                        instance=i + 1,
                        series_uid=series[kind],
                        study_uid=study,
                    )
                )
            out[patient][z] = (paths[0], paths[1])
    return out


def write_tcia_tree(
    root: Path, patients: dict[str, int], size: int = 16
) -> dict[str, dict[float, tuple[Path, Path]]]:
    """``root/<patient>/<study>/<series>/*.dcm`` with "Full Dose Images" / "Low Dose Images",
    plus a localizer series that must be ignored."""
    out: dict[str, dict[float, tuple[Path, Path]]] = {}
    for pi, (patient, n) in enumerate(sorted(patients.items())):
        study = generate_uid()
        study_dir = root / patient / f"1.2.3.{pi}-study"
        series = {"full": generate_uid(), "low": generate_uid()}
        out[patient] = {}
        for i in range(n):
            z = 50.0 - 2.5 * i  # descending, as many scanners write them
            full = ct_image(2000 * pi + i, size)
            low = full + np.random.default_rng(i).normal(0, 20, full.shape).round()
            paths = []
            for kind, img, desc in (("low", low, "Low Dose Images"), ("full", full, "Full Dose Images")):
                paths.append(
                    write_dicom(
                        study_dir / f"{kind}-series" / f"1-{i + 1:03d}.dcm",
                        img,
                        patient=patient,
                        description=desc,
                        z=z,
                        instance=i + 1,
                        series_uid=series[kind],
                        study_uid=study,
                    )
                )
            out[patient][z] = (paths[0], paths[1])
        write_dicom(
            study_dir / "scout" / "1-001.dcm", patient=patient, description="Topogram 0.6 T20f", z=0.0
        )
    return out


@pytest.fixture(scope="session")
def builtin_tree(tmp_path_factory) -> Path:
    """A small built-in DICOM tree (2 phantoms x 2 slices of 64x64, plus CTSMALL)."""
    from ldct.data.builtin import write_builtin

    return write_builtin(tmp_path_factory.mktemp("builtin") / "dicom", progress=False, **BUILTIN_SMALL)


@pytest.fixture(scope="session")
def builtin_cache(builtin_tree, tmp_path_factory) -> Path:
    """The HU cache of :func:`builtin_tree` (read-only for tests: copy it before changing it)."""
    from ldct.data.cache import build_cache

    cache = tmp_path_factory.mktemp("builtin-cache")
    build_cache(builtin_tree, cache, progress=False)
    return cache


@pytest.fixture
def mayo_tree(tmp_path) -> Path:
    root = tmp_path / "mayo"
    write_mayo_tree(root, {"L001": 3, "L002": 2, "L003": 2})
    return root


@pytest.fixture
def tcia_tree(tmp_path) -> Path:
    root = tmp_path / "tcia"
    write_tcia_tree(root, {"C001": 2, "C002": 3})
    return root
