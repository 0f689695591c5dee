"""BM3D cost in `ldct eval`: seconds per slice at 128x128 and 512x512, and the eval's BM3D budget.

    .venv/bin/python benchmarks/bm3d_eval.py [--repeats 3] [--test 512,512,512,128]

Times ``ldct.evaluation.baselines.bm3d_denoise`` (the ``bm3d`` package, both stages) on a real CT slice
(pydicom's CT_small, tiled to 512x512) with simulated 30 HU noise: wall time (median) and the
process's CPU time (all threads), the latter less disturbed by other work on a shared machine.
Then the BM3D share of one `ldct eval`: tuning (``DEFAULT_BM3D_SIGMAS_HU`` candidates on
``DEFAULT_TUNE_SLICES`` validation crops of ``DEFAULT_TUNE_CROP`` px) plus the test slices.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldct.deploy.export import reference_slice  # noqa: E402
from ldct.evaluation import baselines as eval_baselines


def _time(image: np.ndarray, repeats: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        eval_baselines.bm3d_denoise(image, 30.0)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--test", default="512,512,512,128", help="test-split slice sizes (the real panel)")
    args = parser.parse_args()
    hu, _ = reference_slice()
    rng = np.random.default_rng(0)
    per = {}
    for size in (eval_baselines.DEFAULT_TUNE_CROP, 512):
        reps = -(-size // hu.shape[0])
        image = np.tile(hu, (reps, reps))[:size, :size]
        image = (image + rng.normal(0, 30.0, image.shape)).astype(np.float32)
        per[size] = _time(image, args.repeats)
        print(
            f"BM3D {size}x{size}: {per[size][0]:.2f} s wall (median of {args.repeats}), {per[size][1]:.2f} s CPU"
        )
    crop = eval_baselines.DEFAULT_TUNE_CROP
    n_tune = len(eval_baselines.DEFAULT_BM3D_SIGMAS_HU) * eval_baselines.DEFAULT_TUNE_SLICES
    sizes = [int(s) for s in args.test.split(",")]
    tune_s = n_tune * per[crop][0]
    test_s = sum(per[512][0] * (s / 512) ** 2 for s in sizes)
    print(
        f"one `ldct eval`: BM3D tuning {n_tune} runs at {crop}x{crop} ~ {tune_s:.0f} s, "
        f"test slices {sizes} ~ {test_s:.0f} s (area-scaled), total ~ {tune_s + test_s:.0f} s wall"
    )


if __name__ == "__main__":
    main()
