"""Data pipeline speed: DICOM indexing (slices/s) and patch pairs/s through a DataLoader.

    .venv/bin/python benchmarks/data.py [--repeats 3] [--batches 100] [--size 512]

Writes a Mayo-layout tree of ``--size`` x ``--size`` slices (Mayo data are 512 x 512) into a
temporary directory, times a cold ``build_cache`` (header discovery + pixel reading + int16
arrays) and a no-op re-run, then draws 64 x 64 pairs from the cache through a torch DataLoader
(batch 128) with 0 and 2 workers. Figures are medians over the repeats; the target is
>= 20,000 pairs/s.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom.uid import generate_uid  # noqa: E402

from ldct.data.cache import build_cache  # noqa: E402
from ldct.data.discovery import discover  # noqa: E402
from ldct.data.phantoms import phantom_spec, render_phantom  # noqa: E402
from ldct.data.writer import write_ct_slice  # noqa: E402

TARGET_PAIRS_PER_S = 20_000


def write_tree(root: Path, patients: int, slices: int, size: int) -> int:
    """Mayo layout with phantom anatomy (the pixel content does not matter for speed)."""
    rng = np.random.default_rng(0)
    for p in range(patients):
        spec = phantom_spec(rng)
        study, frame = generate_uid(), generate_uid()
        series = {"full": generate_uid(), "quarter": generate_uid()}
        for i in range(slices):
            full = render_phantom(spec, size, 0.7 * 512 / size, 3.0 * i)
            low = full + rng.normal(0, 20, full.shape)
            for kind, img in (("full", full), ("quarter", low)):
                series_dir = root / f"B{p:03d}" / f"{kind}_3mm"
                series_dir.mkdir(parents=True, exist_ok=True)
                write_ct_slice(
                    series_dir / f"{i + 1}.IMA",
                    img,
                    patient=f"B{p:03d}",
                    study_uid=study,
                    series_uid=series[kind],
                    frame_uid=frame,
                    sop_uid=generate_uid(),
                    series_description=f"{kind} dose",
                    series_number=1,
                    instance=i + 1,
                    position=(-179.0, -179.0, 3.0 * i),
                    spacing=(0.7, 0.7),
                    thickness=3.0,
                )
    return patients * slices


def _cpu() -> float:
    """CPU seconds of this process plus its finished children (DataLoader workers once joined)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def time_indexing(root: Path, work: Path, repeats: int, files: int) -> dict[str, float]:
    header, cold, cold_cpu, noop = [], [], [], []
    for r in range(repeats):
        t = time.perf_counter()
        discover(root)
        header.append(time.perf_counter() - t)
        cache = work / f"cache-{r}"
        t, c = time.perf_counter(), time.process_time()
        build_cache(root, cache, progress=False)
        cold.append(time.perf_counter() - t)
        cold_cpu.append(time.process_time() - c)
        t = time.perf_counter()
        build_cache(root, cache, progress=False)
        noop.append(time.perf_counter() - t)
    return {
        "discover_files_per_s": files / statistics.median(header),
        "index_slices_per_s": files / statistics.median(cold),
        "index_slices_per_cpu_s": files / statistics.median(cold_cpu),
        "noop_rerun_s": statistics.median(noop),
    }


def time_patches(
    cache: Path, patients: list[str], workers: int, batches: int, repeats: int
) -> tuple[float, float]:
    """(median pairs per wall second, pairs per CPU second over all processes)."""
    import torch
    from torch.utils.data import DataLoader

    from ldct.data.patches import PatchPairDataset

    ds = PatchPairDataset(cache, patients, patch_size=64, samples=128 * (batches * repeats + 8), seed=0)
    loader = DataLoader(ds, batch_size=128, shuffle=True, num_workers=workers)
    rates = []
    it = iter(loader)
    next(it)  # worker start-up and first memmap touches are not throughput
    cpu0 = _cpu()
    for _ in range(repeats):
        n, t = 0, time.perf_counter()
        for _ in range(batches):
            low, full = next(it)
            n += low.shape[0]
        rates.append(n / (time.perf_counter() - t))
        assert low.dtype == torch.float32 and low.shape == (128, 1, 64, 64)
    del it, loader  # shuts down and joins the workers, so that their CPU time is counted
    gc.collect()
    cpu = _cpu() - cpu0
    return statistics.median(rates), 128 * batches * repeats / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=100, help="batches of 128 per repeat")
    parser.add_argument("--size", type=int, default=512, help="slice size of the indexing tree")
    parser.add_argument("--patients", type=int, default=2)
    parser.add_argument("--slices", type=int, default=20, help="slices per patient and dose")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads of this process (default 1: collating is memory-bound, and on a busy "
        "2-core machine extra OpenMP threads spin and cut the single-process rate by up to 10x)",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory(prefix="ldct-bench-") as tmp:
        work = Path(tmp)
        pairs = write_tree(work / "dicom", args.patients, args.slices, args.size)
        idx = time_indexing(work / "dicom", work, args.repeats, 2 * pairs)
        print(f"DICOM indexing ({2 * pairs} files of {args.size}x{args.size}, median of {args.repeats}):")
        print(f"  header discovery   {idx['discover_files_per_s']:10.0f} files/s")
        print(
            f"  cold build_cache   {idx['index_slices_per_s']:10.0f} slices/s "
            f"({idx['index_slices_per_cpu_s']:.0f} per CPU second)"
        )
        print(f"  no-op re-run       {idx['noop_rerun_s'] * 1000:10.1f} ms")

        cache = work / "cache-0"
        patients = sorted(p.name for p in (work / "dicom").iterdir())
        print(f"Patch pairs 64x64, batch 128, {args.batches} batches x {args.repeats} repeats (median):")
        results = {}
        for workers in (0, 2):
            wall, per_cpu = time_patches(cache, patients, workers, args.batches, args.repeats)
            results[workers] = wall
            print(
                f"  num_workers={workers}      {wall:10.0f} pairs/s  ({per_cpu:.0f} per CPU second, all processes)"
            )
        best = max(results.values())
        verdict = "holds" if best >= TARGET_PAIRS_PER_S else "NOT met"
        print(f"Target >= {TARGET_PAIRS_PER_S} pairs/s: {verdict} (best {best:.0f} pairs/s)")
        # Shared machines: the load average says how much of the 2 cores this run really had.
        print(f"Load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
