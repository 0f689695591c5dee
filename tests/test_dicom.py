"""ldct.data.dicom on real files: HU conversion, both layouts, pairing, splits and every bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from conftest import ct_image, write_dicom, write_mayo_tree
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import MPEG2MPML, JPEG2000Lossless, RLELossless

from ldct.cli import main
from ldct.data.dicom import DicomError, read_frames, read_hu
from ldct.data.discovery import default_split, discover, split_patients

CT_SMALL = get_testdata_file("CT_small.dcm")


def test_ct_small_reads_to_known_hu():
    hu, meta = read_hu(CT_SMALL)
    ds = pydicom.dcmread(CT_SMALL)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert hu.dtype == np.float32 and hu.shape == (128, 128)
    np.testing.assert_array_equal(hu, expected)
    # Spot values and range, independent of the conversion formula above.
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    for r, c in ((0, 0), (64, 64), (100, 30)):
        assert hu[r, c] == int(ds.pixel_array[r, c]) - 1024
    assert hu.min() == -896 and hu.max() == 1167
    assert meta["modality"] == "CT" and meta["shape"] == (128, 128)
    assert meta["spacing"] == pytest.approx((0.661468, 0.661468))
    assert meta["z"] == pytest.approx(-75.7, abs=1e-3)
    assert meta["sop_uid"] == ds.SOPInstanceUID


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    img = ct_image(3)
    path = write_dicom(tmp_path / "a.dcm", img, slope=0.5, intercept=-1000.0)
    hu, _ = read_hu(path)
    np.testing.assert_allclose(hu, img, atol=0.5)


def test_discover_mayo_pairs_by_z_and_groups_by_patient(tmp_path):
    written = write_mayo_tree(tmp_path / "m", {"L001": 4, "L002": 2})
    found = discover(tmp_path / "m")
    assert found.layout == "mayo" and found.skipped == []
    assert sorted(found.patients) == ["L001", "L002"]
    for patient, pairs in found.patients.items():
        zs = [p.z for p in pairs]
        assert zs == sorted(zs) == sorted(written[patient])
        for pair in pairs:
            low, full = written[patient][pair.z]
            assert (pair.low, pair.full) == (low, full)
            assert pair.low_sop == pydicom.dcmread(low).SOPInstanceUID
            assert pair.full_sop == pydicom.dcmread(full).SOPInstanceUID
            assert pair.patient == patient and pair.shape == (16, 16)


def test_discover_tcia_uses_series_description_and_ignores_other_series(tcia_tree):
    found = discover(tcia_tree)
    assert found.layout == "tcia" and sorted(found.patients) == ["C001", "C002"]
    pairs = found.patients["C002"]
    assert [p.z for p in pairs] == [45.0, 47.5, 50.0]
    assert all("low-series" in str(p.low) and "full-series" in str(p.full) for p in pairs)


def test_mayo_thickness_is_selected(tmp_path):
    root = tmp_path / "m"
    write_mayo_tree(root, {"L001": 2}, thickness="3mm")
    write_mayo_tree(root, {"L001": 3}, thickness="1mm", seed=5)
    assert len(discover(root, mayo_thickness="1mm").patients["L001"]) == 3
    assert len(discover(root, mayo_thickness="3mm").patients["L001"]) == 2
    with pytest.raises(DicomError, match="no full_5mm and quarter_5mm"):
        discover(root, mayo_thickness="5mm")


def test_each_patient_uses_its_only_thickness(tmp_path, capsys):
    # What `ldct data simulate` writes keeps each input's SliceThickness: patients at 5 mm and
    # 1 mm in one tree index without --thickness, which only chooses where a patient has several.
    root = tmp_path / "m"
    write_mayo_tree(root, {"A": 2}, thickness="5mm")
    write_mayo_tree(root, {"B": 3}, thickness="1mm", seed=5)
    found = discover(root)
    assert {p: len(v) for p, v in found.patients.items()} == {"A": 2, "B": 3}
    assert main(["data", "index", str(root), "--cache", str(tmp_path / "c"), "--quiet"]) == 0
    assert "2 patients, 5 slice pairs" in capsys.readouterr().out
    write_mayo_tree(root, {"A": 4}, thickness="1mm", seed=9)  # A now has two: the flag decides
    assert len(discover(root, mayo_thickness="1mm").patients["A"]) == 4
    with pytest.raises(DicomError, match=r"no full_3mm and quarter_3mm series \(found full_1mm, full_5mm"):
        discover(root)


def test_pairs_by_instance_number_without_positions(tmp_path):
    root = tmp_path / "m"
    for i in (1, 2, 3):
        for kind in ("full", "quarter"):
            write_dicom(root / "P1" / f"{kind}_3mm" / f"{4 - i}.IMA", ct_image(i), z=None, instance=i)
    pairs = discover(root).patients["P1"]
    assert [p.z for p in pairs] == [1.0, 2.0, 3.0]
    assert all(p.low.name == p.full.name for p in pairs)


# --------------------------------------------------------------------------- bad inputs


def _corrupt(path):
    path.write_bytes(b"this is not a DICOM file" * 10)


def _mr(path):
    write_dicom(path, modality="MR")


def _no_rescale(path):
    write_dicom(path, rescale=False)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_corrupt, "not a DICOM file"),
        (_mr, "Modality is 'MR', not 'CT'"),
        (_no_rescale, "missing RescaleSlope and RescaleIntercept"),
    ],
)
def test_bad_file_is_named(mayo_tree, damage, message):
    bad = mayo_tree / "L002" / "quarter_3mm" / "0001.IMA"
    bad.unlink()
    damage(bad)
    with pytest.raises(DicomError, match=message) as info:
        discover(mayo_tree)
    assert str(bad) in str(info.value) and "--skip-bad" in str(info.value)


def test_truncated_file_is_named(mayo_tree):
    bad = mayo_tree / "L001" / "full_3mm" / "0002.IMA"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DicomError) as info:
        discover(mayo_tree)
    assert str(bad) in str(info.value)


def test_unpaired_slice_is_named(mayo_tree):
    extra = write_dicom(mayo_tree / "L003" / "full_3mm" / "0099.IMA", z=500.0)
    with pytest.raises(DicomError, match=r"unpaired slice \(z position 500.0\)") as info:
        discover(mayo_tree)
    assert str(extra) in str(info.value) and "quarter_3mm" in str(info.value)


def test_shape_mismatch_is_named(tmp_path):
    root = tmp_path / "m"
    write_dicom(root / "P1" / "full_3mm" / "1.IMA", ct_image(1, 16), z=0.0)
    low = write_dicom(root / "P1" / "quarter_3mm" / "1.IMA", ct_image(1, 20), z=0.0)
    with pytest.raises(DicomError, match="20x20 pixels but its full-dose pair") as info:
        discover(root)
    assert str(low) in str(info.value)


def test_spacing_mismatch_is_named(tmp_path):
    root = tmp_path / "m"
    write_dicom(root / "P1" / "full_3mm" / "1.IMA", z=0.0, spacing=(0.7, 0.7))
    low = write_dicom(root / "P1" / "quarter_3mm" / "1.IMA", z=0.0, spacing=(0.8, 0.8))
    with pytest.raises(DicomError, match=r"PixelSpacing \[0.8, 0.8\] mm") as info:
        discover(root)
    assert str(low) in str(info.value)


def test_transfer_syntax_without_any_decoder_is_named(tmp_path):
    # MPEG-2 video: no pydicom plugin decodes it, installed or not.
    path = write_dicom(tmp_path / "mpeg2.dcm", transfer_syntax=MPEG2MPML)
    with pytest.raises(DicomError) as info:
        read_hu(path)
    text = str(info.value)
    assert str(path) in text and "MPEG2" in text.replace("-", "") and "1.2.840.10008.1.2.4.100" in text
    assert "no decoder" in text


def test_corrupt_codestream_is_named(tmp_path):
    # JPEG 2000 has a decoder here (pylibjpeg-openjpeg) but the dummy bytes are not a codestream.
    path = write_dicom(tmp_path / "j2k.dcm", transfer_syntax=JPEG2000Lossless)
    with pytest.raises(DicomError, match="JPEG 2000") as info:
        read_hu(path)
    assert str(path) in str(info.value) and "failed" in str(info.value)


def test_lossless_jpeg2000_twin_gives_the_same_hu():
    uncompressed, meta = read_hu(get_testdata_file("693_UNCR.dcm"))
    lossless, _ = read_hu(get_testdata_file("693_J2KR.dcm"))
    assert uncompressed.shape == (512, 512) and meta["spacing"] == pytest.approx((0.478516, 0.478516))
    np.testing.assert_array_equal(lossless, uncompressed)


def test_lossy_jpeg2000_twin_is_close():
    # pydicom's lossy twin is compressed hard: measured here, soft-tissue errors have a median of
    # 15 HU and an RMSE of 73 HU (edges), a correlation of 0.995 with the original. The tolerance
    # checks that it decodes to the same image (not a shifted/rescaled/garbled one), not that it
    # is a usable full-dose truth: its error exceeds the quarter-dose noise, which is why the
    # built-in set takes the uncompressed file.
    uncompressed, _ = read_hu(get_testdata_file("693_UNCR.dcm"))
    lossy, _ = read_hu(get_testdata_file("693_J2KI.dcm"))
    assert lossy.shape == uncompressed.shape and not np.array_equal(lossy, uncompressed)
    assert np.corrcoef(lossy.ravel(), uncompressed.ravel())[0, 1] > 0.99
    soft = (uncompressed > -100) & (uncompressed < 100)
    err = (lossy - uncompressed)[soft]
    assert np.median(np.abs(err)) < 25.0 and abs(err.mean()) < 10.0


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_encoded_files_decode_to_the_same_hu(tmp_path, syntax):
    img = ct_image(4, 32)
    plain = write_dicom(tmp_path / "plain.dcm", img)
    ds = pydicom.dcmread(plain)
    ds.compress(syntax)
    ds.save_as(tmp_path / "c.dcm")
    np.testing.assert_array_equal(read_hu(tmp_path / "c.dcm")[0], read_hu(plain)[0])


@pytest.mark.parametrize(
    "name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"]
)
def test_pydicom_compressed_twins_decode_like_the_original(tmp_path, name):
    # pydicom's MR twins (JPEG-LS, RLE, JPEG 2000), relabelled as CT with a rescale.
    def as_ct(src, dst):
        ds = pydicom.dcmread(get_testdata_file(src))
        ds.Modality = "CT"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.save_as(dst)
        return dst

    ref, _ = read_hu(as_ct("MR_small.dcm", tmp_path / "ref.dcm"))
    got, _ = read_hu(as_ct(name, tmp_path / "twin.dcm"))
    np.testing.assert_array_equal(got, ref)


def test_enhanced_ct_frames_read_with_their_own_rescale(tmp_path):
    src = get_testdata_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(src)
    stored = [pixel_array(ds, index=i) for i in range(2)]
    hu0, meta0 = read_hu(src, frame=0)
    np.testing.assert_array_equal(hu0, stored[0].astype(np.float32) - 1024)
    assert meta0["spacing"] == pytest.approx((0.388672, 0.388672)) and meta0["frame"] == 0
    # A per-frame rescale overrides the shared one.
    item = Dataset()
    item.RescaleSlope, item.RescaleIntercept, item.RescaleType = 2, -500, "HU"
    ds.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence = DicomSequence([item])
    ds.save_as(tmp_path / "ect.dcm")
    hu1, _ = read_hu(tmp_path / "ect.dcm", frame=1)
    np.testing.assert_array_equal(hu1, stored[1].astype(np.float32) * 2 - 500)
    with pytest.raises(DicomError, match="multi-frame CT with 2 frames"):
        read_hu(src)


def test_enhanced_ct_in_a_tree_pairs_frame_by_frame(tmp_path):
    src = get_testdata_file("eCT_Supplemental.dcm")
    for kind in ("full", "quarter"):
        (tmp_path / "m" / "P1" / f"{kind}_10mm").mkdir(parents=True)
        shutil.copy(src, tmp_path / "m" / "P1" / f"{kind}_10mm" / "1.dcm")
    pairs = discover(tmp_path / "m", mayo_thickness="10mm").patients["P1"]
    # Orientation (-1,0,0 / 0,1,0): normal -z, so the frame at z = -149 comes first.
    assert [(p.low_frame, p.z) for p in pairs] == [(1, pytest.approx(149.0)), (0, pytest.approx(159.0))]


def test_tilted_series_sorts_along_the_slice_normal(tmp_path):
    # Gantry tilt of 30 degrees: slices step along the tilted normal; z alone would order them
    # differently from their true position because x/y shift too.
    c, s_ = np.cos(np.pi / 6), np.sin(np.pi / 6)
    orientation = [1, 0, 0, 0, c, s_]
    normal = np.cross(orientation[:3], orientation[3:])
    root = tmp_path / "m"
    for i, step in enumerate([0.0, 3.0, 6.0]):
        # A large in-plane shift that moves z against the normal order.
        pos = normal * step + np.array([0, -1, 0]) * (0 if i != 1 else 0) + np.array([0, c, s_]) * (-20.0 * i)
        for kind in ("full", "quarter"):
            path = write_dicom(root / "P1" / f"{kind}_3mm" / f"{i}.IMA", ct_image(i), z=0.0, instance=i + 1)
            ds = pydicom.dcmread(path)
            ds.ImageOrientationPatient = orientation
            ds.ImagePositionPatient = [float(v) for v in pos]
            ds.save_as(path)
    pairs = discover(root).patients["P1"]
    assert [p.z for p in pairs] == pytest.approx([0.0, 3.0, 6.0])
    assert [p.low.name for p in pairs] == ["0.IMA", "1.IMA", "2.IMA"]
    zs = [float(pydicom.dcmread(p.low).ImagePositionPatient[2]) for p in pairs]
    assert zs != sorted(zs)  # by z alone the order would be wrong


def test_localizer_is_skipped_with_a_note(mayo_tree):
    scout = write_dicom(mayo_tree / "L001" / "full_3mm" / "9999.IMA", z=900.0)
    ds = pydicom.dcmread(scout)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(scout)
    found = discover(mayo_tree)  # strict mode: a note, not an error
    assert len(found.patients["L001"]) == 3
    assert [(p, "LOCALIZER" in n) for p, n in found.notes] == [(scout, True)]


def test_missing_rescale_is_never_assumed(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", rescale=False)
    with pytest.raises(DicomError, match="missing RescaleSlope and RescaleIntercept") as info:
        read_frames(path)
    assert str(path) in str(info.value)


def test_empty_missing_and_wrong_roots(tmp_path):
    with pytest.raises(DicomError, match="no such directory.*Mayo 2016.*TCIA"):
        discover(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomError, match="contains no patient directories.*expected"):
        discover(tmp_path / "empty")
    wrong = tmp_path / "wrong"
    (wrong / "photos").mkdir(parents=True)
    (wrong / "photos" / "cat.dcm").write_bytes(b"x")
    with pytest.raises(DicomError, match="no DICOM series found in a known layout.*photos"):
        discover(wrong)


def test_patient_directory_given_as_root(mayo_tree):
    with pytest.raises(DicomError, match="looks like one Mayo patient"):
        discover(mayo_tree / "L001")


def test_skip_bad_lists_instead_of_stopping(mayo_tree):
    corrupt = mayo_tree / "L001" / "quarter_3mm" / "0001.IMA"
    corrupt.write_bytes(b"garbage")
    mr = mayo_tree / "L002" / "full_3mm" / "0001.IMA"
    mr.unlink()
    write_dicom(mr, modality="MR", z=-100.0)
    found = discover(mayo_tree, skip_bad=True)
    skipped = {path: reason for path, reason in found.skipped}
    assert corrupt in skipped and mr in skipped
    # Each bad file leaves its partner unpaired, which is listed too.
    assert any("unpaired slice" in reason for reason in skipped.values())
    assert len(found.patients["L001"]) == 2 and len(found.patients["L002"]) == 1
    assert len(found.patients["L003"]) == 2


def test_skip_bad_drops_a_patient_with_nothing_usable(mayo_tree):
    shutil.rmtree(mayo_tree / "L003" / "quarter_3mm")
    found = discover(mayo_tree, skip_bad=True)
    assert "L003" not in found.patients
    assert any(path.name == "L003" and "no quarter_3mm" in reason for path, reason in found.skipped)


# --------------------------------------------------------------------------- splits


def test_split_is_by_patient():
    patients = ["A", "B", "C", "D"]
    split = split_patients(patients, val=["C"], test=["D"])
    assert split == {"train": ["A", "B"], "val": ["C"], "test": ["D"]}
    groups = [set(v) for v in split.values()]
    assert set().union(*groups) == set(patients) and sum(map(len, groups)) == len(patients)
    with pytest.raises(DicomError, match=r"in both val and test"):
        split_patients(patients, val=["C"], test=["C"])
    with pytest.raises(DicomError, match=r"test patient\(s\) \['Z'\] not in the data"):
        split_patients(patients, val=[], test=["Z"])


def test_default_splits():
    assert default_split(["L3", "L1", "L2"]) == (["L2"], ["L3"])
    # Built-in: phantoms validate and test, whatever real slices there are (they train).
    assert default_split(["PH01", "PH02", "PH03", "CTSMALL"], builtin=True) == (["PH01"], ["PH02"])
    real = ["PH01", "PH02", "CTSMALL", "HEAD693", "ABDOMEN", "SPINE", "HEADJ2K"]
    assert default_split(real, builtin=True) == (["PH01"], ["PH02"])
    assert default_split(["PH01", "CTSMALL", "HEAD693"], builtin=True) == ([], ["PH01"])
    assert default_split(["L1"]) == ([], ["L1"])
