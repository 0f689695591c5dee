"""Task-based image quality (`ldct iq`): NPS, TTF and model observers against known answers."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import torch
from conftest import write_dicom
from scipy import ndimage

from ldct.cli import main
from ldct.data import iq_phantoms
from ldct.iq.nps import IQError, nps, remove_ensemble_mean
from ldct.iq.observers import detectability
from ldct.iq.ttf import ttf_from_rod


def test_white_noise_has_a_flat_nps_at_sigma_squared_dx_dy():
    rng = np.random.default_rng(0)
    sigma, dy, dx = 12.0, 0.5, 0.8  # anisotropic pixels: the level is σ²·Δx·Δy all the same
    result = nps(rng.normal(0.0, sigma, (16, 256, 256)), (dy, dx), roi=64)
    level = sigma**2 * dx * dy
    # Every annulus (the first holds only the two fx = ±Δf points: ~5 % noise) and their mean.
    assert result.nps_radial == pytest.approx(np.full_like(result.nps_radial, level), rel=0.2)
    assert result.nps_radial.mean() == pytest.approx(level, rel=0.02)
    assert result.sigma_hu == pytest.approx(sigma, rel=0.01)
    assert result.f_radial[-1] <= 1 / (2 * dx) + 1e-9  # up to the coarser axis' Nyquist
    # A flat spectrum's mean frequency over annuli of equal weight is the mean bin centre.
    assert result.f_avg_per_mm == pytest.approx(result.f_radial.mean(), rel=0.03)


def test_band_pass_noise_peaks_where_its_transfer_does():
    rng = np.random.default_rng(1)
    px, f0 = 0.6, 0.35
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(256, px), np.fft.fftfreq(256, px), indexing="ij"))
    transfer = np.exp(-((f - f0) ** 2) / (2 * 0.04**2))
    noise = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(0, 1, (12, 256, 256))) * transfer))
    result = nps(noise, px, roi=64)
    step = 1 / (64 * px)
    assert abs(result.f_peak_per_mm - f0) <= step
    # The expected mean frequency: |H|² at the same annuli' centres.
    weights = np.exp(-((result.f_radial - f0) ** 2) / 0.04**2)
    assert result.f_avg_per_mm == pytest.approx(np.sum(result.f_radial * weights) / weights.sum(), abs=0.02)


def test_ensemble_mean_removal_keeps_the_per_scan_variance():
    rng = np.random.default_rng(2)
    obj = np.tile(np.linspace(-50, 50, 64), (64, 1))  # structure common to every scan
    scans = obj + rng.normal(0, 5.0, (10, 64, 64))
    noise = remove_ensemble_mean(scans)
    assert noise.std() == pytest.approx(5.0, rel=0.03)
    assert np.abs(noise.mean(axis=0)).max() < 1e-9


def test_ttf_of_a_gaussian_blur_matches_the_gaussians_mtf():
    px, radius, blur = 0.5, 15.0, 0.6
    spec = iq_phantoms.PhantomSpec("water", size=200, pixel_mm=px)
    rod = 100.0 * iq_phantoms._disk(spec, 0.0, 0.0, radius, supersample=8)
    result = ttf_from_rod(ndimage.gaussian_filter(rod, blur / px), (spec.centre_px(),) * 2, radius, px)
    mtf = np.exp(-2 * np.pi**2 * blur**2 * result.f_per_mm**2)
    band = result.f_per_mm <= 0.7
    assert np.abs(result.ttf[band] - mtf[band]).max() < 0.03
    assert result.frequency_at(0.5) == pytest.approx(np.sqrt(np.log(2) / (2 * np.pi**2 * blur**2)), rel=0.02)
    assert result.contrast_hu == pytest.approx(100.0, rel=0.02)


def _disk_signal(m: int, radius_px: float, contrast: float) -> np.ndarray:
    y, x = np.indices((m, m))
    return contrast * (np.hypot(y - (m - 1) / 2, x - (m - 1) / 2) <= radius_px)


def test_npw_on_white_noise_reaches_the_ideal_and_the_cho_does_not_beat_it():
    rng = np.random.default_rng(3)
    signal, sigma = _disk_signal(32, 4.0, 4.0), 20.0
    ideal = np.linalg.norm(signal) / sigma
    present = signal + rng.normal(0, sigma, (300, 32, 32))
    absent = rng.normal(0, sigma, (300, 32, 32))
    npw = detectability(present, absent, signal, observer="npw")
    assert npw["dprime"] == pytest.approx(ideal, rel=0.12)
    cho = detectability(present, absent, signal, observer="cho")
    assert cho["dprime"] <= ideal * 1.05 and cho["dprime"] > 0.6 * ideal
    assert cho["auc_ci"][0] < cho["auc"] < cho["auc_ci"][1]
    # The AUC of a Gaussian d': Φ(d'/√2).
    from scipy.stats import norm

    assert npw["auc"] == pytest.approx(norm.cdf(ideal / np.sqrt(2)), abs=0.04)


def test_detectability_rises_with_dose_on_the_low_contrast_phantom():
    spec = iq_phantoms.PhantomSpec("lcd", size=128, pixel_mm=1.8)
    clean = iq_phantoms.truth(spec)
    diameter, contrast = iq_phantoms.LCD_INSERTS[3]  # 10 mm / 3 HU
    (y, x) = iq_phantoms.ring_positions(iq_phantoms.LCD_RING_MM, 4)[3]
    aucs = []
    for dose in (0.1, 1.0):
        images = iq_phantoms.realizations(spec, dose, 24, seed=5)
        present = iq_phantoms.roi(images, spec, y, x, 15)
        absent = np.concatenate(
            [
                iq_phantoms.roi(images, spec, by, bx, 15)
                for by, bx in iq_phantoms.ring_positions(50.0, 4, 45.0)
            ]
        )
        signal = iq_phantoms.roi(clean, spec, y, x, 15) - 0.0
        aucs.append(detectability(present, absent, signal, observer="npw")["auc"])
    assert aucs[1] > aucs[0] + 0.1, aucs
    fine = iq_phantoms.truth(iq_phantoms.PhantomSpec("lcd", size=256, pixel_mm=0.9))
    assert fine.max() == pytest.approx(14.0, abs=0.01)  # the 3 mm/14 HU insert's centre


@pytest.mark.parametrize(
    ("present", "absent", "signal", "message"),
    [
        ((20, 16, 16), (20, 16, 18), (16, 16), "give equal ROIs"),
        ((20, 16, 16), (20, 16, 16), (15, 15), "template of the ROI size"),
        ((5, 16, 16), (20, 16, 16), (16, 16), "at least 10 are needed"),
    ],
)
def test_bad_observer_input_names_the_file(tmp_path, capsys, present, absent, signal, message):
    paths = []
    for name, shape in (("p.npy", present), ("a.npy", absent), ("s.npy", signal)):
        np.save(tmp_path / name, np.zeros(shape))
        paths.append(str(tmp_path / name))
    code = main(["iq", "lcd", paths[0], paths[1], "--signal", paths[2], "--observer", "npw", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and str(tmp_path) in err


def test_a_pickled_npy_is_refused(tmp_path, capsys):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(["iq", "nps", str(tmp_path / "obj.npy"), "--pixel-mm", "0.5"]) == 2
    assert "not a numeric .npy" in capsys.readouterr().err


def test_nps_cli_on_npy_needs_the_pixel_size_and_reports_json(tmp_path, capsys):
    rng = np.random.default_rng(4)
    np.save(tmp_path / "noise.npy", rng.normal(0, 8.0, (10, 128, 128)))
    assert main(["iq", "nps", str(tmp_path / "noise.npy")]) == 2
    assert "--pixel-mm" in capsys.readouterr().err
    assert main(["iq", "nps", str(tmp_path / "noise.npy"), "--pixel-mm", "0.7", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["sigma_hu"] == pytest.approx(8.0, rel=0.03)
    assert set(out) >= {"sigma_hu", "f_peak_per_mm", "f_avg_per_mm", "radial"}
    assert len(out["radial"]["f_per_mm"]) == len(out["radial"]["nps"])


def test_nps_cli_on_repeated_dicom_scans_removes_their_mean(tmp_path, capsys):
    # Ten "scans" of one water-phantom position: a common structure plus independent noise; the
    # NPS must see the noise only (σ 6 HU), not the structure (which has a std of ~29 HU).
    rng = np.random.default_rng(6)
    structure = np.tile(np.linspace(-50, 50, 96), (96, 1))
    for i in range(10):
        write_dicom(
            tmp_path / "scans" / f"{i}.dcm", structure + rng.normal(0, 6.0, (96, 96)), spacing=(0.6, 0.6)
        )
    assert main(["iq", "nps", str(tmp_path / "scans"), "--roi", "32", "--crop", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ensemble_mean_removed"] is True and out["pixel_mm"] == [0.6, 0.6]
    assert out["sigma_hu"] == pytest.approx(6.0, rel=0.08)
    ds = pydicom.dcmread(tmp_path / "scans" / "0.dcm")
    del ds.PixelSpacing
    ds.save_as(tmp_path / "scans" / "0.dcm")
    assert main(["iq", "nps", str(tmp_path / "scans")]) == 2
    assert "PixelSpacing" in capsys.readouterr().err


def test_phantom_realizations_are_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("LDCT_HOME", str(tmp_path))
    spec = iq_phantoms.PhantomSpec("water", size=64, pixel_mm=3.5)
    first = iq_phantoms.realizations(spec, 0.25, 3, seed=1)
    cached = list((tmp_path / "iq-phantoms").glob("water-*.npz"))
    assert len(cached) == 1
    again = iq_phantoms.realizations(spec, 0.25, 3, seed=1)
    np.testing.assert_array_equal(first, again)
    other = iq_phantoms.realizations(spec, 1.0, 3, seed=1)
    assert len(list((tmp_path / "iq-phantoms").glob("water-*.npz"))) == 2
    noise = first - iq_phantoms.truth(spec)
    body = iq_phantoms.truth(spec) > -500
    assert (
        noise[:, body].std() > (other - iq_phantoms.truth(spec))[:, body].std() * 1.6
    )  # quarter vs full dose


def test_nps_input_errors_are_named():
    rng = np.random.default_rng(7)
    with pytest.raises(IQError, match="ROI of 64 px does not fit"):
        nps(rng.normal(size=(10, 32, 32)), 0.5, roi=64, what="stack.npy")
    with pytest.raises(IQError, match=r"stack.npy: expected a stack \[N, H, W\]"):
        nps(rng.normal(size=(32, 32)), 0.5, what="stack.npy")
    with pytest.raises(IQError, match="pixel size must be positive"):
        nps(rng.normal(size=(10, 64, 64)), 0.0, roi=32)


def test_phantom_table_orders_doses_and_filters_as_physics_says(tmp_path, monkeypatch):
    from ldct.evaluation.iq import markdown, phantom_table

    monkeypatch.setenv("LDCT_HOME", str(tmp_path))
    blur = lambda hu: ndimage.gaussian_filter(hu, 2.0)  # noqa: E731 - a "model" that only smooths
    table = phantom_table(blur, "smoother", dose=0.25, observer="npw", bm3d=False, geometry=(96, 2.4, 12))
    rows = table["rows"]
    assert list(rows) == ["full dose", "LDCT", "Gaussian σ 1 mm", "smoother"]
    full, low, smooth = rows["full dose"]["nps"], rows["LDCT"]["nps"], rows["smoother"]["nps"]
    # Quarter dose: twice the noise σ (a bit more: electronic noise), the same grain.
    assert 1.8 < low["sigma_hu"] / full["sigma_hu"] < 2.4
    assert low["f_avg_per_mm"] == pytest.approx(full["f_avg_per_mm"], rel=0.1)
    # Smoothing lowers σ and moves the noise to lower frequencies, and blurs the rods' edges.
    assert smooth["sigma_hu"] < 0.6 * low["sigma_hu"] and smooth["f_avg_per_mm"] < 0.8 * low["f_avg_per_mm"]
    assert all(r["f50_per_mm"] is not None and r["f50_per_mm"] < 0.2 for r in rows["smoother"]["ttf"])
    assert all(r["f50_per_mm"] is None for r in rows["full dose"]["ttf"])  # only the pixel blurs
    mean_auc = {m: np.mean([r["auc"] for r in row["lcd"]]) for m, row in rows.items()}
    assert mean_auc["full dose"] > mean_auc["LDCT"]
    assert [r["insert"] for r in rows["LDCT"]["lcd"]] == ["3mm/14HU", "5mm/7HU", "7mm/5HU", "10mm/3HU"]
    assert json.loads(json.dumps(table)) == table  # plain JSON: no NaN, no numpy types
    assert "| smoother |" in markdown(table)


def test_the_lcd_guard_refuses_a_model_that_erases_low_contrast_and_passes_one_that_does_not(
    tmp_path, monkeypatch
):
    from ldct.evaluation.iq import guard_message, lcd_guard

    monkeypatch.setenv("LDCT_HOME", str(tmp_path))
    geometry = (128, 1.5, 24)
    # At full dose the inserts are visible (AUC well above 0.5); a "model" that flattens the image
    # to its median leaves nothing to detect.
    eraser = lcd_guard(lambda hu: np.full_like(hu, np.median(hu)), dose=1.0, geometry=geometry)
    assert not eraser["passed"] and eraser["failed_inserts"], eraser
    assert "REFUSED on" in guard_message(eraser)
    keeper = lcd_guard(lambda hu: hu.copy(), dose=1.0, geometry=geometry)
    assert keeper["passed"] and keeper["rows"]["model"] == keeper["rows"]["LDCT"]


def test_a_cho_with_too_few_training_images_is_refused():
    rng = np.random.default_rng(8)
    signal = _disk_signal(16, 3.0, 5.0)
    with pytest.raises(IQError, match="needs more than 10: give at least 22 ROIs per class"):
        detectability(rng.normal(size=(12, 16, 16)), rng.normal(size=(40, 16, 16)), signal, observer="cho")
    assert detectability(
        rng.normal(size=(12, 16, 16)), rng.normal(size=(40, 16, 16)), signal, "cho", channels=4
    )


class _Blur(torch.nn.Module):
    """A "generator" that only smooths (a fixed Gaussian of σ = 1.5 px on the network's scale)."""

    def __init__(self) -> None:
        super().__init__()
        x = torch.arange(-4, 5, dtype=torch.float32)
        g = torch.exp(-(x**2) / (2 * 1.5**2))
        g = g / g.sum()
        self.register_buffer("kernel", (g[:, None] * g[None, :])[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(
            torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect"), self.kernel
        )


def test_trial_fast_iq_knows_the_identity_and_a_blur(tmp_path, monkeypatch):
    from ldct.config import HUNormalization
    from ldct.training import trial_iq

    monkeypatch.setenv("LDCT_HOME", str(tmp_path))
    norm = HUNormalization()
    # The identity keeps its input's figures: the model's and the LDCT row agree.
    same = trial_iq.trial_iq(torch.nn.Identity(), norm, "cpu", 0.25, 10)
    assert same[trial_iq.IQ_METRIC] == pytest.approx(same["iq_ldct_lcd_auc"], abs=1e-3)
    assert same["iq_lcd_auc_gain"] == pytest.approx(0.0, abs=1e-3)
    assert same["iq_sigma_hu"] == pytest.approx(same["iq_ldct_sigma_hu"], rel=1e-4)
    assert same["iq_nps_favg_shift"] == pytest.approx(same["iq_ldct_nps_favg_shift"], abs=1e-4)
    # Quarter dose has the same white-ish grain as full dose: almost no f_avg shift.
    assert abs(same["iq_ldct_nps_favg_shift"]) < 0.03
    assert {f"iq_auc_{d}mm" for d in (3, 5, 7, 10)} <= set(same)
    assert 0.5 < same["iq_ldct_lcd_auc"] <= 1.0
    # A blur lowers σ and moves the grain to lower frequencies (negative shift), on the same
    # realizations.
    blurred = trial_iq.trial_iq(_Blur(), norm, "cpu", 0.25, 10)
    assert blurred["iq_ldct_sigma_hu"] == same["iq_ldct_sigma_hu"]
    assert blurred["iq_sigma_hu"] < 0.5 * blurred["iq_ldct_sigma_hu"]
    assert blurred["iq_nps_favg_shift"] < blurred["iq_ldct_nps_favg_shift"] - 0.05
