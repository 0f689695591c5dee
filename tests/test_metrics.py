"""ldct.metrics against scikit-image, on real CT (CT_small) and its simulated quarter dose."""

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
    FULL_RANGE,
    METRIC_NAMES,
    WINDOW_RANGE,
    MetricAccumulator,
    all_metrics,
    psnr_full,
    psnr_window,
    rmse_hu,
    ssim_full,
    ssim_window,
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
