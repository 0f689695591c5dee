"""ldct.data.simulate: noise statistics of the projection-domain simulation, phantoms, built-in set."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import BUILTIN_SMALL
from pydicom.data import get_testdata_file
from pydicom.uid import UID

from ldct.data.builtin import (
    BUILTIN_MARKER,
    REAL_PATIENT_IDS,
    builtin_params,
    read_builtin_marker,
    real_source,
    write_builtin,
)
from ldct.data.dicom import read_hu
from ldct.data.discovery import discover
from ldct.data.phantoms import make_phantom, phantom_spec, render_phantom
from ldct.data.simulate import simulate_low_dose
from ldct.metrics import psnr_window, ssim_window


def _water_disc(size: int = 128, radius: int = 50) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2.0
    return np.where(xx**2 + yy**2 <= radius**2, 0.0, -1000.0).astype(np.float32)


def test_noise_scales_as_inverse_sqrt_dose_and_is_unbiased():
    disc = _water_disc()
    yy, xx = np.mgrid[:128, :128] - 63.5
    centre = xx**2 + yy**2 <= 15**2
    stats = {}
    for dose in (1.0, 0.5, 0.25, 0.125):
        diffs = [
            simulate_low_dose(disc, dose, np.random.default_rng([int(dose * 1000), k]), noise_free=True)[
                centre
            ]
            - disc[centre]
            for k in range(4)
        ]
        d = np.concatenate(diffs)
        stats[dose] = (d.std(), d.mean())
    for dose, (std, mean) in stats.items():
        ratio = std / stats[1.0][0]
        assert ratio == pytest.approx(np.sqrt(1.0 / dose), rel=0.15), (dose, ratio)
        assert abs(mean) < 5.0, (dose, mean)
    assert 2.0 < stats[1.0][0] < 50.0  # HU: a CT-like magnitude, not a unit slip


def test_simulation_keeps_shape_and_is_deterministic():
    img = _water_disc(64, 25)[:, :48]  # non-square
    a = simulate_low_dose(img, 0.25, np.random.default_rng(1))
    b = simulate_low_dose(img, 0.25, np.random.default_rng(1))
    c = simulate_low_dose(img, 0.25, np.random.default_rng(2))
    assert a.shape == img.shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(
        simulate_low_dose(img, 1.0, np.random.default_rng(1)), img
    )  # nothing to insert
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="dose"):
            simulate_low_dose(img, bad, np.random.default_rng(1))


def test_insertion_into_a_full_dose_image_gives_the_noise_of_the_target_dose():
    # Known truth: a water disc with a bone insert. Simulating dose 1 and then inserting down to
    # d must carry the same noise as simulating d directly; inserting at flux I0*d (the old,
    # uncorrected insertion) carries 1 + 1/d times the dose-1 variance, 25 % too much at d = 0.25.
    size = 128
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2.0
    truth = np.where(xx**2 + yy**2 <= 50**2, 0.0, -1000.0).astype(np.float32)
    truth[(xx - 15) ** 2 + yy**2 <= 8**2] = 700.0
    centre = xx**2 + yy**2 <= 30**2
    d = 0.25
    direct, two_step, uncorrected = [], [], []
    for k in range(6):
        direct.append(simulate_low_dose(truth, d, np.random.default_rng([1, k]), noise_free=True) - truth)
        full = simulate_low_dose(truth, 1.0, np.random.default_rng([2, k]), noise_free=True)
        two_step.append(simulate_low_dose(full, d, np.random.default_rng([3, k])) - truth)
        # Flux I0*d' / (1 - d') = I0*d for d' = d / (1 + d): what the uncorrected code inserted.
        uncorrected.append(simulate_low_dose(full, d / (1 + d), np.random.default_rng([3, k])) - truth)
    var = {
        n: float(np.concatenate([x[centre] for x in v]).var())
        for n, v in (("direct", direct), ("two_step", two_step), ("uncorrected", uncorrected))
    }
    assert var["two_step"] / var["direct"] == pytest.approx(1.0, abs=0.08), var
    assert var["uncorrected"] / var["direct"] > 1.15, var


def test_quarter_dose_psnr_is_in_the_range_of_real_ldct():
    # The paper's Mayo LDCT baseline is 29.2 dB / 0.88 (window convention).
    clean = render_phantom(phantom_spec(np.random.default_rng([0, 1])), 256)
    full = simulate_low_dose(clean, 1.0, np.random.default_rng(1), noise_free=True)
    low = simulate_low_dose(full, 0.25, np.random.default_rng(2))
    psnr, ssim = float(psnr_window(low, full)), float(ssim_window(low, full))
    assert 26.0 < psnr < 33.0 and 0.75 < ssim < 0.95, (psnr, ssim)


def test_phantom_has_plausible_anatomy_and_is_seeded():
    img = make_phantom(128, np.random.default_rng(3))
    np.testing.assert_array_equal(img, make_phantom(128, np.random.default_rng(3)))
    assert not np.array_equal(img, make_phantom(128, np.random.default_rng(4)))
    assert img.dtype == np.float32 and img.shape == (128, 128)
    assert -1100 < img.min() and img.max() < 1600
    frac = lambda lo, hi: float(((img >= lo) & (img < hi)).mean())  # noqa: E731
    assert frac(-1100, -950) > 0.15  # air around the body (and gas)
    assert frac(-130, -70) > 0.05  # fat
    assert frac(20, 90) > 0.10  # soft tissue: organs, muscle
    assert frac(600, 1600) > 0.002  # bone


def test_neighbouring_slices_are_related():
    spec = phantom_spec(np.random.default_rng(7))
    s0, s3, s30 = (render_phantom(spec, 96, z_mm=z) for z in (0.0, 3.0, 30.0))
    near = np.corrcoef(np.clip(s0, -200, 300).ravel(), np.clip(s3, -200, 300).ravel())[0, 1]
    far = np.corrcoef(np.clip(s0, -200, 300).ravel(), np.clip(s30, -200, 300).ravel())[0, 1]
    assert not np.array_equal(s0, s3)
    assert near > 0.95 and far < near


def test_builtin_tree_layout_and_tags(builtin_tree):
    found = discover(builtin_tree)
    assert found.layout == "mayo"
    assert sorted(found.patients) == ["ABDOMEN", "CTSMALL", "HEAD693", "HEADJ2K", "PH01", "PH02", "SPINE"]
    assert [
        len(found.patients[p]) for p in ("PH01", "PH02", "CTSMALL", "HEAD693", "ABDOMEN", "SPINE", "HEADJ2K")
    ] == [
        2,
        2,
        1,
        1,
        1,
        1,
        1,
    ]
    uids = set()
    for pair in found.patients["PH01"] + found.patients["CTSMALL"]:
        for path in (pair.low, pair.full):
            ds = pydicom.dcmread(path)
            assert ds.Modality == "CT" and ds.PatientID == pair.patient
            assert (ds.RescaleIntercept, ds.RescaleSlope, ds.PixelRepresentation) == (-1024, 1, 1)
            assert ds.pixel_array.dtype == np.int16
            for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID):
                assert UID(uid).is_valid
            assert list(ds.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
            assert float(ds.ImagePositionPatient[2]) == pytest.approx(pair.z)
            uids.add(ds.SOPInstanceUID)
    assert len(uids) == 2 * 3  # every file its own SOP instance
    ds = pydicom.dcmread(found.patients["PH01"][0].full)
    assert ds.Rows == ds.Columns == 64 and float(ds.PixelSpacing[0]) == pytest.approx(0.7)
    assert "Quarter Dose" in pydicom.dcmread(found.patients["PH01"][0].low).SeriesDescription


@pytest.mark.parametrize("patient", ["CTSMALL", "HEAD693", "ABDOMEN", "SPINE", "HEADJ2K"])
def test_real_patients_are_the_real_slices_with_simulated_quarter_dose(builtin_tree, patient):
    pair = discover(builtin_tree).patients[patient][0]
    full, meta = read_hu(pair.full)
    low, _ = read_hu(pair.low)
    real, real_meta = read_hu(real_source(patient))
    np.testing.assert_array_equal(full, real)
    # PixelSpacing is written as DS with 6 decimals (SPINE's 0.287109375 mm reads back 0.287109).
    assert meta["spacing"] == pytest.approx(real_meta["spacing"], abs=1e-6)
    body = full > -500
    noise = (low - full)[body]
    # Inserted noise sqrt(1/d - 1) = 1.7x each slice's own: ~6 HU for the quiet heads (3.6 HU
    # native), ~50 HU for CT_small (29 HU native).
    assert 4.0 < noise.std() < 80.0 and abs(noise.mean()) < 5.0, (noise.std(), noise.mean())
    cal = read_builtin_marker(builtin_tree)["calibration"][patient]
    assert cal["effective_dose"] == pytest.approx(0.25, rel=0.12), cal
    assert cal["pixel_size_mm"] == pytest.approx(float(np.mean(meta["spacing"])), rel=1e-5)
    assert cal["native_sigma_hu"] > 0 and cal["i0"] > 0
    assert f"I0 {cal['i0']:g}" in pydicom.dcmread(pair.low).DerivationDescription


def test_builtin_marker_calibrates_only_the_real_slices(builtin_tree):
    marker = read_builtin_marker(builtin_tree)
    assert (
        sorted(marker["calibration"])
        == sorted(REAL_PATIENT_IDS)
        == sorted(["ABDOMEN", "CTSMALL", "HEAD693", "HEADJ2K", "SPINE"])
    )
    # CT_small's own noise is that of ~0.1 of the reference dose: kept, and said so.
    assert marker["calibration"]["CTSMALL"]["source_dose"] < 0.25
    assert "PH01" not in marker["calibration"] and marker["params"]["version"] >= 3


def test_ct_small_source_is_pydicoms_file():
    assert real_source("CTSMALL") == Path(get_testdata_file("CT_small.dcm"))


def test_builtin_cache_key_follows_the_simulation_code(monkeypatch, tmp_path):
    from ldct.data import builtin

    before = builtin_params(0.25, 2, 2, 64, 0, 0.7)
    copy = tmp_path / "data"
    copy.mkdir()
    for name in builtin._CODE_MODULES:
        (copy / name).write_bytes((Path(builtin.__file__).parent / name).read_bytes())
    (copy / "simulate.py").write_text((copy / "simulate.py").read_text() + "\n# changed\n")
    monkeypatch.setattr(builtin, "__file__", str(copy / "builtin.py"))
    after = builtin_params(0.25, 2, 2, 64, 0, 0.7)
    assert before["code"] != after["code"] and {**before, "code": 0} == {**after, "code": 0}


def test_builtin_is_deterministic(builtin_tree, tmp_path):
    again = write_builtin(tmp_path / "again", progress=False, **BUILTIN_SMALL)
    files = sorted(p.relative_to(builtin_tree) for p in builtin_tree.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (builtin_tree / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_builtin_refuses_foreign_directory_and_rewrites_only_when_needed(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and is not a built-in tree"):
        write_builtin(foreign, phantoms=1, slices=1, size=32, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"

    out = tmp_path / "tree"
    out.mkdir()  # an empty directory is fine
    write_builtin(out, phantoms=2, slices=1, size=32, progress=False)
    marker = out / BUILTIN_MARKER
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.IMA")}
    write_builtin(out, phantoms=2, slices=1, size=32, progress=False)  # same parameters: no-op
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.IMA")} == stamp and marker.is_file()
    write_builtin(out, phantoms=1, slices=1, size=32, progress=False)  # new parameters: replaced
    assert sorted(os.listdir(out)) == [
        BUILTIN_MARKER,
        "ABDOMEN",
        "CTSMALL",
        "HEAD693",
        "HEADJ2K",
        "PH01",
        "SPINE",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
