"""What a LOSO repeat (``ldct repeat --protocol loso``) costs on this machine, before running it.

Measures one short in-process training run of the profile (seconds per iteration and per
validation), one run's Ray Train start-up (a constant: ~30 s on 2 cores, docs/DESIGN.md §5a), and
the evaluation of one noise realization of a 512² real slice (re-simulation, BM3D with σ estimated,
one generator forward, the metrics), then prints the estimate for
runs = folds × arms × seeds and evaluations = folds × realizations × (arms × seeds + 2).

    python benchmarks/loso_cost.py                      # quick profile, 5 folds, 2 arms, 1 seed, K = 4
    python benchmarks/loso_cost.py --arms 5 --seeds 2 --realizations 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


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
    from ldct.training.loop import prepare_data, run_local

    cfg = load_config(args.profile)
    short = load_config(
        args.profile,
        [f"train.iterations={args.iterations}", f"train.val_every={args.iterations}"],
    )
    cache_dir, _ = prepare_data(short)
    with tempfile.TemporaryDirectory() as tmp:
        tick = time.perf_counter()
        session = run_local(short, Path(tmp))
        wall = time.perf_counter() - tick
        report = session.reports[-1]
        per_it = report["train_seconds"] / args.iterations
        per_val = max(wall - report["train_seconds"], 0.0)  # validation + checkpoint + set-up
        generator, run_cfg = generator_from_state(load_state(session.checkpoints[-1]))
    t = cfg.train
    validations = -(-t.iterations // t.val_every)
    per_run = args.startup + t.iterations * per_it + validations * per_val
    runs = args.folds * args.arms * args.seeds

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
        f"measured: {per_it:.3f} s/iteration, {per_val:.1f} s per validation (short run of {args.iterations})"
    )
    print(f"one run: {args.startup:.0f} s start-up + {t.iterations * per_it:.0f} s training + "
          f"{validations * per_val:.0f} s validation = {per_run / 60:.1f} min")  # fmt: skip
    print(
        f"runs: {args.folds} folds x {args.arms} arms x {args.seeds} seeds = {runs} -> {runs * per_run / 60:.1f} min"
    )
    print(f"one realization of {args.slice} ({full.shape[0]}²): simulate {simulate:.1f} s, LDCT + BM3D(σ est.) "
          f"{bm3d_s:.1f} s, model + metrics {model:.2f} s per run; {per_realization:.1f} s in all")  # fmt: skip
    print(f"evaluation: {args.folds} folds x {args.realizations} realizations -> {evaluation / 60:.1f} min "
          "(upper bound: the 128² CTSMALL costs less; BM3D outputs are cached on a re-run)")  # fmt: skip
    print(
        f"total: {(runs * per_run + evaluation) / 60:.1f} min with runs one at a time (study.max_concurrent = 1)"
    )


if __name__ == "__main__":
    main()
