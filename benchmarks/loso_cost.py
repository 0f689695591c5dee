"""What a LOSO repeat (``ldct repeat --protocol loso``) costs on this machine, before running it.

Measures short training runs of the profile as the repeat schedules them: ``study.max_concurrent``
runs at once, each in its own process with the profile's ``train.torch_threads`` (two 1-thread runs
share 2 cores; one run alone would be faster than either of them), giving seconds per iteration
and per validation; one run's Ray Train start-up (a constant: ~30 s on 2 cores, docs/DESIGN.md
§5a); and the evaluation of one noise realization of a 512² real slice (re-simulation, BM3D with σ
estimated, one generator forward, the metrics). It prints the estimate for
runs = folds × arms × seeds, in waves of ``max_concurrent``, and
evaluations = folds × realizations × (arms × seeds + 2).

    python benchmarks/loso_cost.py                      # quick profile, 5 folds, 2 arms, 1 seed, K = 4
    python benchmarks/loso_cost.py --arms 5 --seeds 2 --realizations 8
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any


def _short_run(profile: str, iterations: int, out: str) -> dict[str, Any]:
    """One short in-process training run (in a worker process); its timings and last checkpoint."""
    from ldct.config import load_config
    from ldct.training.loop import run_local

    short = load_config(profile, [f"train.iterations={iterations}", f"train.val_every={iterations}"])
    tick = time.perf_counter()
    session = run_local(short, Path(out))
    wall = time.perf_counter() - tick
    report = session.reports[-1]
    return {
        "wall": wall,
        "train_seconds": report["train_seconds"],
        "checkpoint": str(session.checkpoints[-1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--iterations", type=int, default=20, help="iterations of the measured short run")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--arms", type=int, default=2, help="e.g. 2 = tuned + paper-matched")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--realizations", type=int, default=4)
    parser.add_argument("--startup", type=float, default=30.0, help="Ray Train start-up per run [s]")
    parser.add_argument("--slice", default="SPINE", help="real slice timed for one realization")
    args = parser.parse_args()

    import numpy as np

    from ldct.config import load_config
    from ldct.data.manifest import open_patient
    from ldct.evaluation.baselines import BM3DCache, EstimatedSigmaBM3D
    from ldct.evaluation.denoisers import torch_denoiser
    from ldct.study.loso import bm3d_estimated, realizations, score_image, slice_info
    from ldct.training.checkpoint import generator_from_state, load_state
    from ldct.training.loop import prepare_data

    cfg = load_config(args.profile)
    cache_dir, _ = prepare_data(cfg)  # made once here, not raced by the parallel runs
    parallel = max(1, cfg.study.max_concurrent)
    with tempfile.TemporaryDirectory() as tmp:
        # spawn: a forked child would inherit this process's torch thread pool.
        with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [
                pool.submit(_short_run, args.profile, args.iterations, str(Path(tmp) / f"run{i}"))
                for i in range(parallel)
            ]
            measured = [f.result() for f in futures]
        per_it = max(m["train_seconds"] for m in measured) / args.iterations
        # validation + checkpoint + set-up of the slowest run
        per_val = max(max(m["wall"] - m["train_seconds"], 0.0) for m in measured)
        generator, run_cfg = generator_from_state(load_state(measured[0]["checkpoint"]))
    t = cfg.train
    validations = -(-t.iterations // t.val_every)
    per_run = args.startup + t.iterations * per_it + validations * per_val
    runs = args.folds * args.arms * args.seeds
    waves = -(-runs // parallel)

    info = slice_info(cache_dir, [args.slice])[args.slice]
    full = np.asarray(open_patient(cache_dir, args.slice)[1][0], dtype=np.float32)
    denoise = torch_denoiser(generator, run_cfg.normalization, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        bm3d = EstimatedSigmaBM3D(BM3DCache(tmp))  # an empty cache: BM3D's first-time cost
        tick = time.perf_counter()
        low = realizations(full, args.slice, info, cfg.data.builtin_dose, 1, 0)[0]
        simulate = time.perf_counter() - tick
        tick = time.perf_counter()
        score_image(low, full, info["window"])
        bm3d_estimated(low, info["pixel_size_mm"], bm3d)
        bm3d_s = time.perf_counter() - tick
        tick = time.perf_counter()
        score_image(np.asarray(denoise(low), dtype=np.float32), full, info["window"])
        model = time.perf_counter() - tick
    per_realization = simulate + bm3d_s + args.arms * args.seeds * model
    evaluation = args.folds * args.realizations * per_realization

    print(
        f"profile {cfg.profile}: {t.iterations} iterations of batch {t.batch_size}, validation every {t.val_every}"
    )
    print(
        f"measured: {per_it:.3f} s/iteration, {per_val:.1f} s per validation ({parallel} short run(s) of "
        f"{args.iterations} at once, {t.torch_threads or 'default'} torch thread(s) each)"
    )
    print(f"one run: {args.startup:.0f} s start-up + {t.iterations * per_it:.0f} s training + "
          f"{validations * per_val:.0f} s validation = {per_run / 60:.1f} min")  # fmt: skip
    print(
        f"runs: {args.folds} folds x {args.arms} arms x {args.seeds} seeds = {runs}, {parallel} at a time "
        f"(study.max_concurrent) -> {waves} waves, {waves * per_run / 60:.1f} min"
    )
    print(f"one realization of {args.slice} ({full.shape[0]}²): simulate {simulate:.1f} s, LDCT + BM3D(σ est.) "
          f"{bm3d_s:.1f} s, model + metrics {model:.2f} s per run; {per_realization:.1f} s in all")  # fmt: skip
    print(f"evaluation: {args.folds} folds x {args.realizations} realizations -> {evaluation / 60:.1f} min "
          "(upper bound: the 128² CTSMALL costs less; BM3D outputs are cached on a re-run)")  # fmt: skip
    print(f"total: {(waves * per_run + evaluation) / 60:.1f} min")


if __name__ == "__main__":
    main()
