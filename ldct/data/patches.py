"""Torch datasets over the HU cache: random low/full patch pairs for training, whole slices for
evaluation.

Both datasets open the cached arrays lazily, once per process (pickling a dataset for a DataLoader
worker or a Ray worker carries only paths), and hand out values already scaled to the network's
[0, 1] range by the configured :class:`~ldct.config.HUNormalization`.

Patch draws are a pure function of (seed, epoch, index, attempt): the same index gives the same
patch in any process, with any number of workers or any batch composition, so a run is
reproducible and a DistributedSampler's shards are disjoint draws.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ldct.config import HUNormalization, PatchSampling
from ldct.data.manifest import load_manifest

AIR_HU = -900.0
# Soft tissue for min_tissue_fraction: the abdomen window of the metrics (docs/DESIGN.md §3).
TISSUE_HU = (-160.0, 240.0)
MAX_ATTEMPTS = 16
SAMPLINGS: tuple[str, ...] = typing.get_args(PatchSampling)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a counter-based hash, vectorised over uint64 arrays."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _uniforms(seed: int, epoch: int, index: np.ndarray, attempt: int, count: int) -> np.ndarray:
    """[len(index), count] uniforms in [0, 1), each a pure function of its arguments."""
    with np.errstate(over="ignore"):
        key = _mix(
            np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(epoch & 0xFFFFFFFF)
        )
        base = _mix(key ^ _mix(index.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03) + np.uint64(attempt)))
        streams = _mix(
            base[:, None] + np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        )
    return (streams >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


class _CachedArrays:
    """Per-process handle on the memmaps of some cached patients (never pickled)."""

    def __init__(self, cache_dir: Path, patients: Sequence[str]) -> None:
        manifest = load_manifest(cache_dir)
        missing = [p for p in patients if p not in manifest.patients]
        if missing:
            raise KeyError(
                f"patients {missing} are not in the cache {cache_dir}; cached: {manifest.all_patients}"
            )
        self.low, self.full, self.shapes = [], [], []
        for p in patients:
            arrays = manifest.patients[p]["arrays"]
            # np.asarray drops the np.memmap subclass (same mapping, no copy): its Python-level
            # __getitem__ would otherwise cost more than cutting the patch itself.
            self.low.append(np.asarray(np.load(cache_dir / arrays["low"], mmap_mode="r")))
            self.full.append(np.asarray(np.load(cache_dir / arrays["full"], mmap_mode="r")))
            self.shapes.append(tuple(manifest.patients[p]["shape"]))


class _LazyCache:
    """Opens the arrays on first use in each process; pickles as paths only."""

    def __init__(self, cache_dir: Path | str, patients: Sequence[str]) -> None:
        self.cache_dir = Path(cache_dir)
        self.patients = list(patients)
        if not self.patients:
            raise ValueError(f"no patients given for a dataset over {self.cache_dir}")
        self._arrays: _CachedArrays | None = None
        self._pid = -1
        manifest = load_manifest(self.cache_dir)  # fail early, in the constructing process
        missing = [p for p in self.patients if p not in manifest.patients]
        if missing:
            raise KeyError(
                f"patients {missing} are not in the cache {self.cache_dir}; cached: {manifest.all_patients}"
            )
        self.shapes = [tuple(manifest.patients[p]["shape"]) for p in self.patients]

    @property
    def arrays(self) -> _CachedArrays:
        if self._arrays is None or self._pid != os.getpid():
            self._arrays = _CachedArrays(self.cache_dir, self.patients)
            self._pid = os.getpid()
        return self._arrays

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = None
        state["_pid"] = -1
        return state


class PatchPairDataset(Dataset):
    """Random (low, full) patch pairs, each [1, P, P] float32 in [0, 1].

    A patch whose full-dose fraction of air (HU < -900) exceeds ``max_air_fraction``, or whose
    fraction of soft tissue (HU in [-160, 240], the window the study scores) is below
    ``min_tissue_fraction``, is redrawn (up to 16 attempts; the last draw is kept). The tissue
    rule steers training to where the window metrics look; 0 (default) turns it off.

    ``sampling`` says how a patch's slice is drawn: ``"slice"`` (default) gives every slice of the
    given patients the same chance, ``"area"`` weights each slice by its number of patch
    positions, so every training pixel is equally likely and a 512² slice is not worth the same
    as a 256² one. Positions are uniform inside the slice. ``__getitems__`` serves a whole batch
    with vectorised draws (torch's DataLoader uses it automatically).
    """

    def __init__(
        self,
        cache_dir: Path | str,
        patients: Sequence[str],
        patch_size: int = 64,
        samples: int = 10_000,
        seed: int = 0,
        max_air_fraction: float = 0.9,
        normalization: HUNormalization = HUNormalization(),  # noqa: B008 - frozen, immutable
        min_tissue_fraction: float = 0.0,
        sampling: str = "slice",
        noise_scale: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        lo_scale, hi_scale = (float(v) for v in noise_scale)
        if not 0.0 <= lo_scale <= hi_scale:
            raise ValueError(
                f"noise_scale (data.noise_scale) must be [low, high] with 0 <= low <= high, got {noise_scale!r}"
            )
        self.noise_scale = (lo_scale, hi_scale)
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling (data.patch_sampling) must be one of {SAMPLINGS}, got {sampling!r}")
        self.sampling = sampling
        if not 0.0 <= min_tissue_fraction <= 1.0:
            raise ValueError(f"min_tissue_fraction must be in [0, 1], got {min_tissue_fraction}")
        self.min_tissue_fraction = float(min_tissue_fraction)
        self._cache = _LazyCache(cache_dir, patients)
        self.patch_size = int(patch_size)
        self.samples = int(samples)
        self.seed = int(seed)
        self.epoch = 0
        self.max_air_fraction = float(max_air_fraction)
        self.normalization = normalization
        for p, (_, h, w) in zip(self._cache.patients, self._cache.shapes, strict=True):
            if min(h, w) < self.patch_size:
                raise ValueError(f"patch_size {self.patch_size} is larger than patient {p}'s {h}x{w} slices")
        # Global slice table: slice k of the dataset = (patient, slice index); sizes per slice.
        counts = [s for s, _, _ in self._cache.shapes]
        self._slice_patient = np.repeat(np.arange(len(counts)), counts)
        self._slice_index = np.concatenate([np.arange(c) for c in counts]) if counts else np.zeros(0, int)
        self._rows = np.array([self._cache.shapes[p][1] for p in self._slice_patient]) - self.patch_size + 1
        self._cols = np.array([self._cache.shapes[p][2] for p in self._slice_patient]) - self.patch_size + 1
        if len(self._slice_patient) == 0:
            raise ValueError(f"patients {list(patients)} have no cached slices")
        # Upper edges of each slice's share of [0, 1): a uniform maps to its slice by searchsorted.
        weights = (self._rows * self._cols if sampling == "area" else np.ones(len(self._rows))).astype(float)
        self._slice_edges = np.cumsum(weights) / weights.sum()

    @property
    def patients(self) -> list[str]:
        return list(self._cache.patients)

    def set_epoch(self, epoch: int) -> None:
        """A different, still deterministic, draw for every epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        low, full = self._batch(np.asarray([index]))
        return low[0], full[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        low, full = self._batch(np.asarray(indices))
        return list(zip(low, full, strict=True))

    def _locations(self, index: np.ndarray, attempt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u = _uniforms(self.seed, self.epoch, index, attempt, 3)
        k = np.minimum(
            np.searchsorted(self._slice_edges, u[:, 0], side="right"), len(self._slice_patient) - 1
        )
        r = (u[:, 1] * self._rows[k]).astype(np.int64)
        c = (u[:, 2] * self._cols[k]).astype(np.int64)
        return k, r, c

    def _cut(self, volumes: list[np.ndarray], k, r, c, out: np.ndarray, rows: np.ndarray) -> None:
        # Plain slicing in a loop beats fancy indexing here: each patch is P contiguous row reads.
        p = self.patch_size
        sp, si = self._slice_patient, self._slice_index
        for j, kk, rr, cc in zip(rows.tolist(), k.tolist(), r.tolist(), c.tolist(), strict=True):
            out[j] = volumes[sp[kk]][si[kk], rr : rr + p, cc : cc + p]

    def _batch(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if index.size and (index.min() < 0 or index.max() >= self.samples):
            raise IndexError(f"index out of range for {self.samples} samples")
        arrays = self._cache.arrays
        n, p = len(index), self.patch_size
        full = np.empty((n, p, p), np.int16)
        low = np.empty((n, p, p), np.int16)
        k, r, c = self._locations(index, 0)
        todo = np.arange(n)
        self._cut(arrays.full, k, r, c, full, todo)
        max_air = self.max_air_fraction * p * p
        min_tissue = self.min_tissue_fraction * p * p
        lo, hi = TISSUE_HU
        for attempt in range(1, MAX_ATTEMPTS):
            patches = full[todo]
            redraw = np.count_nonzero(patches < AIR_HU, axis=(1, 2)) > max_air
            if min_tissue > 0:
                tissue = np.count_nonzero((patches >= lo) & (patches <= hi), axis=(1, 2))
                redraw |= tissue < min_tissue
            todo = todo[redraw]
            if todo.size == 0:
                break
            k2, r2, c2 = self._locations(index[todo], attempt)
            k[todo], r[todo], c[todo] = k2, r2, c2
            self._cut(arrays.full, k2, r2, c2, full, todo)
        self._cut(arrays.low, k, r, c, low, np.arange(n))
        if self.noise_scale != (1.0, 1.0):
            return self._to_unit(self._rescaled_noise(index, low, full)), self._to_unit(full)
        return self._to_unit(low), self._to_unit(full)

    def _rescaled_noise(self, index: np.ndarray, low: np.ndarray, full: np.ndarray) -> np.ndarray:
        # full + a·(low - full), a uniform in noise_scale per patch: the pair's own noise texture at
        # another level (inserted variance ∝ a², i.e. a dose d' with 1/d' - 1 = a²·(1/d - 1)).
        lo, hi = self.noise_scale
        # Attempt number MAX_ATTEMPTS: a stream the position draws never use, so the factor is
        # independent of the patch's place and of how often it was redrawn.
        a = lo + (hi - lo) * _uniforms(self.seed, self.epoch, index, MAX_ATTEMPTS, 1)[:, 0]
        noise = np.subtract(low, full, dtype=np.float32)
        noise *= a.astype(np.float32)[:, None, None]
        return noise + full

    def _to_unit(self, hu: np.ndarray) -> torch.Tensor:
        # (hu - min) / span, clipped to [0, 1], in place in one float32 buffer.
        norm = self.normalization
        scale = np.float32(1.0 / (norm.hu_max - norm.hu_min))
        unit = np.multiply(hu, scale, dtype=np.float32)
        np.subtract(unit, np.float32(norm.hu_min) * scale, out=unit)
        np.clip(unit, 0.0, 1.0, out=unit)
        return torch.from_numpy(unit)[:, None]


class SliceDataset(Dataset):
    """Whole slices: (low [1, H, W], full [1, H, W]) in [0, 1] and ``{"patient", "index"}``.

    ``max_slices > 0`` keeps that many slices spread evenly over the patients' slices (a cheap,
    fixed validation subset)."""

    def __init__(
        self,
        cache_dir: Path | str,
        patients: Sequence[str],
        normalization: HUNormalization = HUNormalization(),  # noqa: B008 - frozen, immutable
        max_slices: int = 0,
    ) -> None:
        self._cache = _LazyCache(cache_dir, patients)
        self.normalization = normalization
        items = [(pi, s) for pi, (n, _, _) in enumerate(self._cache.shapes) for s in range(n)]
        if max_slices and max_slices < len(items):
            keep = np.linspace(0, len(items) - 1, max_slices).round().astype(int)
            items = [items[i] for i in keep]
        self._items = items

    @property
    def patients(self) -> list[str]:
        return list(self._cache.patients)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        pi, s = self._items[index]
        arrays = self._cache.arrays
        norm = self.normalization
        low = norm.to_unit(torch.from_numpy(np.asarray(arrays.low[pi][s], dtype=np.float32)))
        full = norm.to_unit(torch.from_numpy(np.asarray(arrays.full[pi][s], dtype=np.float32)))
        return low[None], full[None], {"patient": self._cache.patients[pi], "index": s}
