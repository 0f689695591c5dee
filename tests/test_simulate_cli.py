"""`ldct data simulate` on a real 512x512 slice (pydicom-data's 693_UNCR.dcm) and on bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest
from conftest import write_dicom
from pydicom.data import get_testdata_file

from ldct.cli import main
from ldct.data.cache import build_cache
from ldct.data.dicom import DicomError, read_hu
from ldct.data.discovery import discover
from ldct.data.simulate import I0_FULL_DOSE
from ldct.data.simulate_tree import SIDECAR, simulate_tree


def _tree_bytes(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def head_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("sim")
    src = base / "in"
    src.mkdir()
    shutil.copy(get_testdata_file("693_UNCR.dcm"), src / "slice.dcm")
    before = _tree_bytes(src)
    assert (
        main(["data", "simulate", str(src), str(base / "a"), "--dose", "0.25", "--seed", "3", "--quiet"]) == 0
    )
    simulate_tree(src, base / "b", dose=0.25, seed=3, progress=False)
    simulate_tree(src, base / "half", dose=0.5, seed=3, progress=False)
    return base, src, before


def _thickness(out):
    # The output keeps the input's SliceThickness (693 is a 5 mm slice): full_5mm/quarter_5mm.
    return next(out.glob("*/full_*")).name.removeprefix("full_")


def _pair(out):
    pair = next(iter(discover(out, mayo_thickness=_thickness(out)).patients.values()))[0]
    return pair, read_hu(pair.full)[0], read_hu(pair.low)[0]


def test_full_dose_is_the_input_and_quarter_follows_the_insertion_model(head_runs):
    base, src, _ = head_runs
    truth, _ = read_hu(src / "slice.dcm")
    _, full, low = _pair(base / "a")
    _, full_half, low_half = _pair(base / "half")
    np.testing.assert_array_equal(full, truth)
    np.testing.assert_array_equal(full_half, truth)
    head = truth > -500
    diff, diff_half = (low - full)[head], (low_half - full_half)[head]
    # Inserted variance ~ 1/d - 1: 3 at d = 0.25, 1 at d = 0.5.
    assert diff.std() / diff_half.std() == pytest.approx(np.sqrt(3.0), rel=0.15)
    assert abs(diff.mean()) < 0.05 * diff.std() + 1.0


def test_same_seed_same_bytes_new_uids_input_untouched(head_runs):
    base, src, before = head_runs
    assert _tree_bytes(base / "a") == _tree_bytes(base / "b")
    assert _tree_bytes(src) == before
    source = pydicom.dcmread(src / "slice.dcm")
    old = {
        source.SOPInstanceUID,
        source.SeriesInstanceUID,
        source.StudyInstanceUID,
        source.get("FrameOfReferenceUID"),
    }
    pair, _, _ = _pair(base / "a")
    seen = set()
    for path in (pair.full, pair.low):
        ds = pydicom.dcmread(path)
        uids = {ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID}
        assert not uids & old
        seen |= {ds.SOPInstanceUID, ds.SeriesInstanceUID}
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.PatientID == source.PatientID
        assert ds.ContributingEquipmentSequence[-1].SoftwareVersions
    assert len(seen) == 4
    low = pydicom.dcmread(pair.low)
    assert list(low.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert "dose 0.25" in low.DerivationDescription and "seed 3" in low.DerivationDescription
    assert "I0*d/(1-d)" in low.DerivationDescription
    assert low.SeriesNumber != pydicom.dcmread(pair.full).SeriesNumber
    assert low.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    sidecar = json.loads((base / "a" / "ldct-simulate.json").read_text())
    assert (sidecar["dose"], sidecar["seed"], sidecar["i0"]) == (0.25, 3, None)  # None: calibrated
    assert sidecar["tool_version"] and len(sidecar["files"]) == 1


def test_output_indexes_and_different_seed_differs(head_runs, tmp_path):
    base, src, _ = head_runs
    assert _thickness(base / "a") == "5mm"
    manifest = build_cache(base / "a", tmp_path / "cache", mayo_thickness="5mm", progress=False)
    assert sum(e["shape"][0] for e in manifest.patients.values()) == 1
    with pytest.raises(FileExistsError, match="not empty"):
        simulate_tree(src, base / "a", progress=False)
    with pytest.raises(ValueError, match="overlap"):
        simulate_tree(src, src / "out", progress=False)


def test_keep_transfer_syntax_writes_jpeg2000_lossless(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    img = np.clip(np.random.default_rng(0).normal(40, 20, (64, 64)), -1000, 1000)
    plain = write_dicom(src / "a.dcm", img, spacing=(0.7, 0.7))
    ds = pydicom.dcmread(plain)
    ds.compress(pydicom.uid.JPEG2000Lossless)
    ds.save_as(plain)
    simulate_tree(src, tmp_path / "out", keep_transfer_syntax=True, i0=I0_FULL_DOSE, progress=False)
    pair = next(iter(discover(tmp_path / "out").patients.values()))[0]
    assert pydicom.dcmread(pair.full).file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    np.testing.assert_array_equal(read_hu(pair.full)[0], read_hu(plain)[0])


def test_bad_files_are_named_and_skip_bad_goes_on(tmp_path, capsys):
    src = tmp_path / "in"
    good = write_dicom(src / "good.dcm", spacing=(0.7, 0.7))
    mr = write_dicom(src / "mr.dcm", modality="MR")
    with pytest.raises(DicomError, match="not 'CT'") as info:
        simulate_tree(src, tmp_path / "o1", i0=I0_FULL_DOSE, progress=False)
    assert str(mr) in str(info.value)
    mr.unlink()
    nospacing = write_dicom(src / "nospacing.dcm")
    ds = pydicom.dcmread(nospacing)
    del ds.PixelSpacing
    ds.save_as(nospacing)
    fixed = ["--i0", "1.5e5", "--quiet"]  # 16x16 slices: too small to measure their noise
    assert main(["data", "simulate", str(src), str(tmp_path / "o2"), *fixed]) == 1
    err = capsys.readouterr().err
    assert str(nospacing) in err and "PixelSpacing" in err
    assert main(["data", "simulate", str(src), str(tmp_path / "o3"), "--skip-bad", *fixed]) == 0
    out = capsys.readouterr().out
    assert "skipped 1" in out and str(nospacing) in out
    assert not (tmp_path / "o2").exists() and good.is_file()
    # Calibrated (the default), a slice whose noise cannot be measured is named, with what to do.
    nospacing.unlink()
    assert main(["data", "simulate", str(src), str(tmp_path / "o4"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert str(good) in err and "soft tissue" in err and "--i0" in err and not (tmp_path / "o4").exists()


@pytest.mark.parametrize("layout", ["mayo_tree", "tcia_tree"])
def test_known_layouts_simulate_from_their_full_dose_series(layout, request, tmp_path):
    root = request.getfixturevalue(layout)
    report = simulate_tree(root, tmp_path / "out", dose=0.5, i0=I0_FULL_DOSE, progress=False)
    found = discover(tmp_path / "out")
    source = discover(root)
    assert sorted(found.patients) == sorted(source.patients)
    for patient, pairs in source.patients.items():
        got = found.patients[patient]
        assert [p.z for p in got] == [p.z for p in pairs]
        for mine, theirs in zip(got, pairs, strict=True):
            np.testing.assert_array_equal(read_hu(mine.full)[0], read_hu(theirs.full)[0])
    # Only the full-dose inputs were used (the trees' own low-dose series are not sources).
    assert len(report["files"]) == sum(len(v) for v in source.patients.values())


def test_calibration_is_recorded_and_the_effective_dose_is_the_requested_one(head_runs):
    # 693_UNCR (HEAD693): ~3.6 HU of native noise; the default flux gave it an effective dose of
    # ~0.01 at "0.25". Calibrated, the measured var(full)/var(low) is the requested dose.
    base, _, _ = head_runs
    sidecar = json.loads((base / "a" / SIDECAR).read_text())
    assert sidecar["i0"] is None and "native noise" in sidecar["calibration"] and sidecar["estimator"]
    [entry] = sidecar["files"]
    assert entry["calibration"] == "native" and 2.0 < entry["native_sigma_hu"] < 6.0
    assert entry["effective_dose"] == pytest.approx(0.25, rel=0.10) and entry["i0"] > 1.5e5
    half = json.loads((base / "half" / SIDECAR).read_text())["files"][0]
    assert half["effective_dose"] == pytest.approx(0.5, rel=0.10)
    pair, _, _ = _pair(base / "a")
    ds = pydicom.dcmread(pair.low)
    assert ds.ImageComments.startswith("ldct calibration ")
    recorded = json.loads(ds.ImageComments.removeprefix("ldct calibration "))
    assert recorded["i0"] == entry["i0"] and recorded["effective_dose"] == entry["effective_dose"]
    assert f"I0 {entry['i0']:g}" in ds.DerivationDescription and "native noise" in ds.DerivationDescription
