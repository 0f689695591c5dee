"""The loss-weight study: Optuna (TPE) over λ₂ (L1), λ₃ (perceptual), λ_gp and the learning rate.

    ldct study --profile quick                                # one machine, built-in data
    python studies/loss_weights.py --profile quick            # the same (a thin caller of this)
    ray submit cluster/cluster.yaml studies/loss_weights.py   # the cluster (paper profile)

On a cluster head (the launcher leaves ~/ray_bootstrap_config.yaml there) the default profile is
`paper`; elsewhere it is `quick`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def cluster_default_profile() -> str:
    """``paper`` on a Ray cluster head, ``quick`` elsewhere."""
    return "paper" if (Path.home() / "ray_bootstrap_config.yaml").is_file() else "quick"


def main(argv: list[str] | None = None, default_profile: str | None = None, prog: str | None = None) -> int:
    """Run the study (``ldct study``, ``python studies/loss_weights.py``); returns the exit code."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--profile",
        default=default_profile or cluster_default_profile(),
        help="a profile name (`ldct profiles`) or a .toml path",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a profile value (repeatable)",
    )
    parser.add_argument("--trials", type=int, help="number of trials (default: study.trials of the profile)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument(
        "--storage", help="Ray storage for trials and checkpoints (default ./runs; shared on a cluster)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted study of the same name"
    )
    parser.add_argument("--no-report", action="store_true", help="skip writing results/<study>/")
    parser.add_argument("--results", default="results", help="where the report goes (default ./results)")
    args = parser.parse_args(argv)
    # Passive OpenMP waiting before torch loads anywhere (ldct.train.cpu_thread_env says why).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from ldct.config import ConfigError, load_config

    try:
        cfg = load_config(args.profile, args.overrides)
    except ConfigError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2

    from ldct.tracking import TrackingError
    from ldct.train import TrainingError
    from ldct.tune import run_study

    try:
        result = run_study(
            cfg, trials=args.trials, tracking_uri=args.tracking_uri, resume=args.resume, storage=args.storage
        )
    except (TrainingError, TrackingError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1

    completed = sum(t["status"] == "completed" for t in result.trials)
    print(
        f"\nstudy {result.study}: {completed}/{len(result.trials)} trials completed in "
        f"{result.wall_seconds / 60:.1f} min; training steps took {result.train_seconds / 60:.1f} min "
        f"({100 * result.train_seconds / max(result.wall_seconds, 1e-9):.0f} % of the wall time)"
    )
    if result.registered_version:
        print(f"registered ldct-denoiser version {result.registered_version} as alias 'candidate'")
    if not args.no_report:
        from ldct.report import write_report

        out = write_report(
            result.study,
            tracking_uri=result.tracking_uri,
            results_root=args.results,
            cfg=cfg,
            study_result=result,
        )
        if result.pareto is not None:
            from ldct.pareto import write_front

            write_front(result.pareto["rows"], result.pareto["min_fps"], result.pareto["message"], out)
            print((out / "pareto.md").read_text())
        print((out / "leaderboard.md").read_text())
        print(f"report: {out}")
    print(f"compare the runs:  mlflow ui --backend-store-uri {result.tracking_uri}")
    return 0 if completed else 1
