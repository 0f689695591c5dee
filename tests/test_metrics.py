"""ldct.metrics against scikit-image, on real CT (CT_small) and its simulated quarter dose; the
body mask, the anatomy windows and the body metrics on disk phantoms with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldct.data.dicom import read_hu
from ldct.data.simulate import embed_in_body, simulate_low_dose
from ldct.metrics import (
    BRAIN_WINDOW,
    FULL_RANGE,
    METRIC_NAMES,
    SOFT_TISSUE_WINDOW,
    WINDOW_RANGE,
    MetricAccumulator,
    MetricError,
    all_metrics,
    body_mask,
    psnr_body,
    psnr_full,
    psnr_window,
    resolve_window,
    rmse_body_hu,
    rmse_hu,
    ssim_body,
    ssim_full,
    ssim_window,
    window_for,
)


@pytest.fixture(scope="module")
def ct_pairs() -> tuple[np.ndarray, np.ndarray]:
    """[3, 128, 128] predictions and targets in HU: simulated quarter dose, a smoothed image and a
    second quarter-dose realisation, each against the real CT_small slice."""
    full, meta = read_hu(get_testdata_file("CT_small.dcm"))
    canvas, where = embed_in_body(full, meta["spacing"][0])
    quarter = [
        simulate_low_dose(canvas, 0.25, np.random.default_rng(s), pixel_size_mm=meta["spacing"][0])[where]
        for s in (0, 1)
    ]
    smooth = ndimage.gaussian_filter(full, 1.0)
    return np.stack([quarter[0], smooth, quarter[1]]), np.stack([full, full, full])


def _skimage(pred: np.ndarray, target: np.ndarray, hu_range: tuple[float, float]) -> tuple[float, float]:
    lo, hi = hu_range
    p, t = np.clip(pred, lo, hi).astype(np.float64), np.clip(target, lo, hi).astype(np.float64)
    psnr = peak_signal_noise_ratio(t, p, data_range=hi - lo)
    ssim = structural_similarity(
        t, p, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=hi - lo
    )
    return psnr, ssim


@pytest.mark.parametrize(
    ("hu_range", "psnr_fn", "ssim_fn"),
    [(WINDOW_RANGE, psnr_window, ssim_window), (FULL_RANGE, psnr_full, ssim_full)],
    ids=["window", "full"],
)
def test_batched_metrics_agree_with_skimage(ct_pairs, hu_range, psnr_fn, ssim_fn):
    pred, target = ct_pairs
    psnr, ssim = (
        psnr_fn(pred, target),
        ssim_fn(torch.from_numpy(pred)[:, None], torch.from_numpy(target)[:, None]),
    )
    assert psnr.shape == ssim.shape == (3,)
    for i in range(3):
        ref_psnr, ref_ssim = _skimage(pred[i], target[i], hu_range)
        assert float(psnr[i]) == pytest.approx(ref_psnr, abs=1e-4)
        assert float(ssim[i]) == pytest.approx(ref_ssim, abs=1e-4)
    # The conventions differ as they should: the window is far stricter than the full range.
    assert float(psnr_window(pred, target)[0]) < float(psnr_full(pred, target)[0]) - 10


def test_rmse_and_all_metrics(ct_pairs):
    pred, target = ct_pairs
    expected = np.sqrt(((pred.astype(np.float64) - target) ** 2).mean(axis=(1, 2)))
    np.testing.assert_allclose(rmse_hu(pred, target).numpy(), expected, rtol=1e-10)
    values = all_metrics(pred, target)
    assert tuple(values) == METRIC_NAMES and all(v.shape == (3,) for v in values.values())
    assert METRIC_NAMES[:3] == ("psnr_body", "ssim_body", "rmse_body_hu")


def test_identical_images_and_accumulator(ct_pairs):
    pred, target = ct_pairs
    assert math.isinf(float(psnr_window(target[:1], target[:1])[0]))
    assert float(ssim_full(target[:1], target[:1])[0]) == pytest.approx(1.0)
    acc = MetricAccumulator()
    acc.update(pred[:1], target[:1])
    acc.update(pred[1:], target[1:])
    means = acc.mean()
    assert acc.count == 3
    for name, values in all_metrics(pred, target).items():
        assert means[name] == pytest.approx(float(values.mean()))
    with pytest.raises(ValueError, match="shape"):
        psnr_window(pred[:, :64], target)


# --------------------------------------------------------------------------- body metrics


def _disk_phantom(size: int = 96, radius: float = 30.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, reference) HU [size, size]: a 40 HU disk with a -300 HU insert in -1000 HU air."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2.0
    ref = np.full((size, size), -1000.0)
    ref[xx**2 + yy**2 <= radius**2] = 40.0
    ref[(xx - 8) ** 2 + yy**2 <= 36] = -300.0  # above the body threshold: part of the body
    noisy = ref + np.random.default_rng(seed).normal(0.0, 25.0, ref.shape)
    return noisy, ref


def test_body_mask_of_a_disk_is_the_disk_eroded_by_two_pixels():
    size, radius = 96, 30.0
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2.0
    ref = np.where(xx**2 + yy**2 <= radius**2, 40.0, -1000.0)
    ref[(xx - 10) ** 2 + yy**2 <= 25] = -900.0  # a hole (gas): filled, part of the body
    ref[:4, :4] = 500.0  # a small bright object in the air (a couch): not the largest component
    disk = xx**2 + yy**2 <= radius**2
    expected = ndimage.binary_erosion(disk, iterations=2)
    mask = body_mask(ref)
    assert mask.dtype == bool and mask.shape == ref.shape
    np.testing.assert_array_equal(mask, expected)
    # Batches and tensors keep their shape and kind; a body running off the image keeps its border.
    batch = body_mask(torch.from_numpy(np.stack([ref, np.full_like(ref, 40.0)]))[:, None])
    assert batch.shape == (2, 1, size, size) and batch.dtype == torch.bool
    assert torch.equal(batch[0, 0], torch.from_numpy(expected)) and bool(batch[1].all())
    # All air: the whole image (documented fallback), never an empty mask.
    assert body_mask(np.full((16, 16), -1000.0)).all()


def test_body_metrics_known_answers():
    noisy, ref = _disk_phantom()
    mask = body_mask(ref)
    e = 8.0
    pred = np.where(mask, ref + e, ref)  # a constant error e inside the body, none outside
    assert float(rmse_body_hu(pred, ref)[0]) == pytest.approx(e, rel=1e-12)
    # Inside the soft-tissue window (every body pixel stays within [-160, 240] except the -300
    # insert, which clips on both sides): the error outside the insert is e.
    inside = mask & (ref > -160)
    pred_soft = np.where(inside, ref + e, ref)
    mse = e**2 * inside.sum() / mask.sum()
    assert float(psnr_body(pred_soft, ref, SOFT_TISSUE_WINDOW)[0]) == pytest.approx(
        10 * math.log10(400.0**2 / mse), abs=1e-9
    )
    uniform = np.where(mask, 40.0, -1000.0)
    shifted = np.where(mask, 40.0 + e, -1000.0)
    assert float(psnr_body(shifted, uniform, BRAIN_WINDOW)[0]) == pytest.approx(20 * math.log10(80.0 / e))
    assert float(psnr_body(shifted, uniform)[0]) == pytest.approx(20 * math.log10(400.0 / e))
    assert float(ssim_body(uniform, uniform)[0]) == pytest.approx(1.0)


def test_ssim_body_is_the_mean_of_skimages_full_map_over_the_mask(ct_pairs):
    pred, target = ct_pairs  # CT_small: its body runs off the image, so edge pixels count
    lo, hi = BRAIN_WINDOW
    mask = body_mask(target[0])
    assert mask[0].any() or mask[-1].any()
    _, full_map = structural_similarity(
        np.clip(target[0], lo, hi).astype(np.float64),
        np.clip(pred[0], lo, hi).astype(np.float64),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=hi - lo,
        full=True,
    )
    assert float(ssim_body(pred[:1], target[:1], BRAIN_WINDOW)[0]) == pytest.approx(
        full_map[mask].mean(), abs=1e-10
    )


def test_air_padding_moves_body_metrics_by_nothing_and_window_metrics_by_decibels():
    noisy, ref = _disk_phantom()

    def pad(a: np.ndarray) -> np.ndarray:
        return np.pad(a, 64, constant_values=-1000.0)

    before, after = all_metrics(noisy, ref), all_metrics(pad(noisy), pad(ref))
    assert abs(float(after["psnr_body"] - before["psnr_body"])) < 0.01
    assert abs(float(after["ssim_body"] - before["ssim_body"])) < 1e-4
    assert abs(float(after["rmse_body_hu"] - before["rmse_body_hu"])) < 0.01
    # The whole-slice figures count the added air as perfectly denoised pixels.
    assert float(after["psnr_window"] - before["psnr_window"]) > 3.0
    assert float(after["ssim_window"] - before["ssim_window"]) > 0.05


def test_window_for_and_resolve_window():
    for part in ("HEAD", "head", " Brain ", "SKULL", "HEAD ROUTINE"):
        assert window_for(part) == BRAIN_WINDOW == (0.0, 80.0)
    for part in (None, "", "ABDOMEN", "PANCREAS", "CHEST", "NECK", "HEADNECK", "HEAD_NECK", "FOREHEAD"):
        assert window_for(part) == SOFT_TISSUE_WINDOW == (-160.0, 240.0)
    assert resolve_window("auto", "HEAD") == BRAIN_WINDOW
    assert resolve_window("soft_tissue", "HEAD") == SOFT_TISSUE_WINDOW
    assert resolve_window("brain", "ABDOMEN") == BRAIN_WINDOW
    with pytest.raises(MetricError, match="unknown window mode 'lung'"):
        resolve_window("lung", None)
    with pytest.raises(MetricError, match="string or None"):
        window_for(3)


def test_body_metrics_bad_input():
    noisy, ref = _disk_phantom(size=32, radius=10)
    with pytest.raises(MetricError, match="lo < hi"):
        psnr_body(noisy, ref, (80.0, 0.0))
    with pytest.raises(MetricError, match=r"\(lo, hi\)"):
        all_metrics(noisy, ref, "brain")
    with pytest.raises(MetricError, match="mask shape"):
        psnr_body(noisy, ref, mask=np.ones((8, 8), bool))
    with pytest.raises(MetricError, match="empty"):
        rmse_body_hu(noisy, ref, mask=np.zeros_like(ref, dtype=bool))
    with pytest.raises(MetricError, match="11x11"):
        ssim_body(noisy[:8, :8], ref[:8, :8])
    with pytest.raises(MetricError, match="expected"):
        body_mask(np.zeros((2, 3, 8, 8)))
    # MetricError is a ValueError: callers that caught ValueError still do.
    with pytest.raises(ValueError, match="shape"):
        psnr_body(noisy[:, :16], ref)
