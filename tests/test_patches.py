"""ldct.data.patches: patch pairs and whole slices from the cache, with real DataLoader workers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ldct.config import HUNormalization
from ldct.data.cache import open_patient
from ldct.data.patches import PatchPairDataset, SliceDataset

PHANTOMS = ["PH01", "PH02"]


def test_patch_pairs_are_normalised_crops_of_the_same_place(builtin_cache):
    ds = PatchPairDataset(builtin_cache, PHANTOMS, patch_size=16, samples=64, seed=3)
    low, full = ds[5]
    assert low.shape == full.shape == (1, 16, 16) and low.dtype == full.dtype == torch.float32
    assert 0.0 <= float(low.min()) and float(full.max()) <= 1.0
    # Recompute the crop from the cached HU at the location the dataset drew.
    batch_low, batch_full = ds._batch(np.arange(64))
    norm = HUNormalization()
    arrays = {p: open_patient(builtin_cache, p) for p in PHANTOMS}
    checked = 0
    for i in range(0, 64, 4):
        k, r, c = (int(v[0]) for v in ds._locations(np.array([i]), 0))
        patient, s = PHANTOMS[ds._slice_patient[k]], ds._slice_index[k]
        lo_hu, fu_hu = arrays[patient]
        if (np.asarray(fu_hu[s, r : r + 16, c : c + 16]) < -900).mean() > 0.9:
            continue  # this one was redrawn
        expect_full = norm.to_unit(torch.from_numpy(np.asarray(fu_hu[s, r : r + 16, c : c + 16], np.float32)))
        expect_low = norm.to_unit(torch.from_numpy(np.asarray(lo_hu[s, r : r + 16, c : c + 16], np.float32)))
        torch.testing.assert_close(batch_full[i, 0], expect_full)
        torch.testing.assert_close(batch_low[i, 0], expect_low)
        checked += 1
    assert checked >= 8


def test_draws_are_deterministic_and_independent_of_batching(builtin_cache):
    a = PatchPairDataset(builtin_cache, PHANTOMS, patch_size=16, samples=50, seed=1)
    b = PatchPairDataset(builtin_cache, PHANTOMS, patch_size=16, samples=50, seed=1)
    c = PatchPairDataset(builtin_cache, PHANTOMS, patch_size=16, samples=50, seed=2)
    items = a.__getitems__([7, 3, 42])
    torch.testing.assert_close(items[1][0], b[3][0])
    torch.testing.assert_close(items[2][1], b[42][1])
    assert not torch.equal(a[3][1], c[3][1])
    before = a[3][1].clone()
    a.set_epoch(1)
    assert not torch.equal(a[3][1], before)
    with pytest.raises(IndexError):
        a[50]


def test_mostly_air_patches_are_redrawn(builtin_cache):
    strict = PatchPairDataset(
        builtin_cache, PHANTOMS, patch_size=24, samples=400, seed=0, max_air_fraction=0.2
    )
    loose = PatchPairDataset(
        builtin_cache, PHANTOMS, patch_size=24, samples=400, seed=0, max_air_fraction=1.0
    )
    air_unit = float(HUNormalization().to_unit(torch.tensor(-900.0)))

    def air(ds):
        _, full = ds._batch(np.arange(400))
        return (full < air_unit).float().mean(dim=(1, 2, 3))

    assert float((air(loose) > 0.2).float().mean()) > 0.2  # the phantoms have plenty of air
    assert float((air(strict) > 0.2).float().mean()) < 0.01


def test_tissue_favouring_draws_more_soft_tissue(builtin_cache):
    norm = HUNormalization()
    lo, hi = (float(norm.to_unit(torch.tensor(v))) for v in (-160.0, 240.0))

    def tissue(min_fraction):
        ds = PatchPairDataset(
            builtin_cache, PHANTOMS, patch_size=24, samples=300, seed=1, min_tissue_fraction=min_fraction
        )
        _, full = ds._batch(np.arange(300))
        return ((full >= lo) & (full <= hi)).float().mean(dim=(1, 2, 3))

    off, on = tissue(0.0), tissue(0.7)
    assert float((off < 0.7).float().mean()) > 0.2  # bone, fat, air edges: plenty below 70 %
    assert float((on < 0.7).float().mean()) < 0.05 and float(on.mean()) > float(off.mean())
    with pytest.raises(ValueError, match="min_tissue_fraction"):
        PatchPairDataset(builtin_cache, PHANTOMS, min_tissue_fraction=1.5)


def test_area_sampling_weighs_slices_by_their_size(builtin_cache):
    # PH01: 2 slices of 64² (49² positions of a 16² patch each); CTSMALL: 1 slice of 128² (113²).
    def share_of_ctsmall(sampling):
        ds = PatchPairDataset(
            builtin_cache,
            ["PH01", "CTSMALL"],
            patch_size=16,
            samples=4000,
            seed=5,
            max_air_fraction=1.0,
            sampling=sampling,
        )
        k, _, _ = ds._locations(np.arange(4000), 0)
        return float(np.mean(ds._slice_patient[k] == 1))

    assert abs(share_of_ctsmall("slice") - 1 / 3) < 0.03
    assert abs(share_of_ctsmall("area") - 113**2 / (113**2 + 2 * 49**2)) < 0.03
    with pytest.raises(ValueError, match=r"data.patch_sampling\) must be one of"):
        PatchPairDataset(builtin_cache, PHANTOMS, sampling="pixels")


def test_noise_scale_rescales_each_pairs_own_noise(builtin_cache):
    def pairs(noise_scale):
        ds = PatchPairDataset(
            builtin_cache, PHANTOMS, patch_size=24, samples=200, seed=2, noise_scale=noise_scale
        )
        low, full = ds._batch(np.arange(200))
        return low.double(), full.double()

    low1, full1 = pairs((1.0, 1.0))
    low_half, full_half = pairs((0.5, 0.5))
    torch.testing.assert_close(full_half, full1)  # targets and positions are untouched
    # Away from the [0, 1] clip, the noise is exactly half of the pair's own noise.
    inside = (low1 > 0.01) & (low1 < 0.99) & (full1 > 0.01) & (full1 < 0.99)
    torch.testing.assert_close((low_half - full1)[inside], 0.5 * (low1 - full1)[inside], atol=1e-5, rtol=0)
    # A range draws one factor per patch, reproducibly: per-patch std ratios spread over [0.5, 1.5].
    low_a, _ = pairs((0.5, 1.5))
    low_b, _ = pairs((0.5, 1.5))
    assert torch.equal(low_a, low_b)
    ratio = (low_a - full1).flatten(1).std(dim=1) / (low1 - full1).flatten(1).std(dim=1)
    assert 0.45 < float(ratio.min()) < 0.7 and 1.3 < float(ratio.max()) < 1.55
    with pytest.raises(ValueError, match=r"data.noise_scale\) must be"):
        PatchPairDataset(builtin_cache, PHANTOMS, noise_scale=(1.5, 0.5))


def test_dataloader_with_two_workers_matches_single_process(builtin_cache):
    ds = PatchPairDataset(builtin_cache, PHANTOMS, patch_size=16, samples=96, seed=4)
    clone = pickle.loads(pickle.dumps(ds))
    ds[0]  # open the memmaps in this process: they must not travel with the dataset
    assert len(pickle.dumps(ds)) < 20_000 and clone._cache._arrays is None

    def collect(workers):
        loader = DataLoader(ds, batch_size=32, num_workers=workers, shuffle=False)
        return [torch.cat(parts) for parts in zip(*loader, strict=True)]

    single, multi = collect(0), collect(2)
    assert single[0].shape == (96, 1, 16, 16)
    torch.testing.assert_close(single[0], multi[0])
    torch.testing.assert_close(single[1], multi[1])


def test_distributed_sampler_shards_are_disjoint_draws(builtin_cache):
    ds = PatchPairDataset(builtin_cache, PHANTOMS, patch_size=16, samples=40, seed=0)
    shards = [list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1])
    batch = next(iter(DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, 2, 1, shuffle=False))))
    assert batch[0].shape == (8, 1, 16, 16)


def test_patch_larger_than_slices_and_unknown_patients_are_errors(builtin_cache):
    with pytest.raises(ValueError, match="patch_size 128 is larger than patient PH01's 64x64"):
        PatchPairDataset(builtin_cache, ["PH01"], patch_size=128)
    with pytest.raises(KeyError, match=r"\['NOPE'\] are not in the cache"):
        PatchPairDataset(builtin_cache, ["NOPE"])


def test_slice_dataset(builtin_cache):
    ds = SliceDataset(builtin_cache, ["PH01", "CTSMALL"])
    assert len(ds) == 3
    low, full, info = ds[2]
    assert info == {"patient": "CTSMALL", "index": 0} and low.shape == full.shape == (1, 128, 128)
    hu = np.asarray(open_patient(builtin_cache, "CTSMALL")[1][0], np.float32)
    torch.testing.assert_close(full[0], HUNormalization().to_unit(torch.from_numpy(hu)))
    sub = SliceDataset(builtin_cache, ["PH01", "PH02"], max_slices=2)
    assert [sub[i][2] for i in range(len(sub))] == [
        {"patient": "PH01", "index": 0},
        {"patient": "PH02", "index": 1},
    ]
    batch = next(iter(DataLoader(SliceDataset(builtin_cache, PHANTOMS), batch_size=2, num_workers=0)))
    assert batch[0].shape == (2, 1, 64, 64) and batch[2]["patient"] == ["PH01", "PH01"]
