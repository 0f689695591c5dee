"""The loss-weight study: Optuna (TPE) over λ₃/λ₂ (perceptual), λ_adv/λ₂ (adversarial), λ_gp and the
learning rate, λ₂ (L1) fixed at 1 (RED-CNN: the learning rate only); ASHA prunes poor trials.

    ldct study --profile quick                                                    # one machine
    python studies/loss_weights.py --profile quick                                # the same (thin caller)
    ray submit cluster/local.yaml studies/loss_weights.py -- --profile paper      # a cluster
    ray job submit --working-dir . -- python studies/loss_weights.py --profile paper

The profile is never guessed from leftovers on disk: it is --profile, else LDCT_PROFILE (which the
cluster configs set for Ray Jobs), else `quick` - and where a Ray cluster is running (RAY_ADDRESS,
or `ray start` on this machine) --profile or LDCT_PROFILE is required, so a former head node never
trains the GPU profile by accident. `ldct profiles` lists the profiles.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from ldct.cli.common import EXIT_ERROR, EXIT_OK
from ldct.cluster import down_cluster, in_ray_job, running_cluster, wait_for_nodes
from ldct.config import Config, ConfigError, list_profiles, load_config
from ldct.errors import TrainingError
from ldct.study.pareto import write_front
from ldct.study.preflight import report
from ldct.study.report import write_report
from ldct.study.run import StudyResult, run_study
from ldct.tracking.store import TrackingError, client, describe_store


def choose_profile(explicit: str | None, prog: str = "loss_weights") -> str:
    """--profile, else LDCT_PROFILE, else `quick` - except on a cluster, where one must be given."""
    if explicit:
        return explicit
    if os.environ.get("LDCT_PROFILE"):
        return os.environ["LDCT_PROFILE"]

    cluster = running_cluster()
    if cluster:
        raise SystemExit(
            f"{prog}: a Ray cluster is running here ({cluster}): pass --profile explicitly "
            f"(paper for the GPU cluster, quick or smoke for a check) or set LDCT_PROFILE"
        )
    return "quick"


def _parser(prog: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--profile",
        help="a profile name (`ldct profiles`) or a .toml path (default: LDCT_PROFILE, else quick; required on a cluster)",
    )
    parser.add_argument(
        "--name", help="study name (default: study.name of the profile); a new name = a new study"
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
    parser.add_argument(
        "--check",
        action="store_true",
        help="only report every missing input (weights, data, storage, MLflow)",
    )
    parser.add_argument("--no-report", action="store_true", help="skip writing results/<study>/")
    parser.add_argument(
        "--results",
        help="where the report goes (default ./results; under Ray Jobs <storage>/results, and always "
        "also the study's MLflow run as artifacts report/)",
    )
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the study (``ldct study``, ``python studies/loss_weights.py``); returns the exit code."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    profile = choose_profile(args.profile, parser.prog)
    overrides = [*args.overrides, *([f"study.name={args.name}"] if args.name else [])]
    try:
        cfg = load_config(profile, overrides)
    except ConfigError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        return report(cfg, storage=args.storage, tracking_uri=args.tracking_uri)
    try:
        result = run_study(
            cfg, trials=args.trials, tracking_uri=args.tracking_uri, resume=args.resume, storage=args.storage
        )
    except (TrainingError, TrackingError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1

    completed = sum(t["status"] == "completed" for t in result.trials)
    pruned = sum(t["status"] == "stopped" for t in result.trials)
    print(
        f"\nstudy {result.study}: {completed}/{len(result.trials)} trials completed ({pruned} pruned by ASHA) in "
        f"{result.wall_seconds / 60:.1f} min; {steps_line(result.train_seconds, result.wall_seconds, cfg.study.max_concurrent)}"
    )
    if result.registered_version:
        print(f"registered ldct-denoiser version {result.registered_version} as alias 'candidate'")
    if not args.no_report:
        _report(args.results, cfg, result)
    print(describe_store(client(result.tracking_uri), result.study).replace("[ldct] ", ""))
    if result.tracking_uri.startswith("http"):
        print("(from your machine, forward the head's MLflow port first: ray attach CLUSTER.yaml -p PORT)")
    if result.registration_error:
        print(f"{parser.prog}: error: registration failed: {result.registration_error}", file=sys.stderr)
    return 0 if completed and not result.registration_error else 1


def steps_line(train_seconds: float, wall_seconds: float, concurrent: int) -> str:
    """How much of a study's wall time its training steps filled. With trials running side by side
    their step times add up past the wall time, so the share is of ``concurrent`` x the wall time."""
    share = 100 * train_seconds / max(wall_seconds * max(concurrent, 1), 1e-9)
    if concurrent <= 1:
        return f"training steps took {train_seconds / 60:.1f} min ({share:.0f} % of the wall time)"
    return (
        f"training steps took {train_seconds / 60:.1f} min summed over trials, up to {concurrent} at a time "
        f"({share:.0f} % of {concurrent} x the wall time)"
    )


def _report(results: str | None, cfg: Config, result: StudyResult) -> None:
    """results/<study>/ (and the parent run's artifacts), then its tables on stdout."""
    if results is None and in_ray_job():
        # A Ray Job's working directory is deleted with the job: keep the report beside the
        # checkpoints when they are on a (shared) path, else only in MLflow.
        results = f"{result.storage}/results" if "://" not in result.storage else tempfile.mkdtemp()
    out = write_report(
        result.study,
        tracking_uri=result.tracking_uri,
        results_root=results or "results",
        cfg=cfg,
        study_result=result,
    )
    if result.pareto is not None:
        pareto = result.pareto
        write_front(pareto["rows"], pareto["objectives"], pareto["rule"], pareto["message"], out)
        print((out / "pareto.md").read_text())
    print((out / "leaderboard.md").read_text())
    if (out / "best_test.md").is_file():
        # The best trial on the test split (a phantom on the built-in data: the real slices are
        # the LOSO repeat's), beside LDCT and the classical baselines tuned on validation.
        print((out / "best_test.md").read_text())
    print(f"report: {out} (and artifacts report/ of MLflow run {result.parent_run_id})")


def cmd_study(args: argparse.Namespace) -> int:
    return main(args.passthrough_args, prog="ldct study")


def cmd_cluster_wait(args: argparse.Namespace) -> int:
    """``ldct cluster wait --nodes N``: after ``ray up``, before submitting a study."""
    wait_for_nodes(args.nodes, args.timeout, progress=lambda line: print(line, flush=True))
    return 0


def cmd_cluster_down(args: argparse.Namespace) -> int:
    """``ldct cluster down CONFIG``: on the machine that ran ``ray up``."""
    down_cluster(args.config, progress=lambda line: print(line, flush=True))
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    profiles = list_profiles()
    if not profiles:
        print("no profiles found (the package's ldct/profiles/ is missing)", file=sys.stderr)
        return EXIT_ERROR
    width = max(len(n) for n in profiles)
    for name, path in profiles.items():
        # The first comment line of a profile says what it is for.
        first = next(
            (ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), ""
        )
        print(f"{name:<{width}}  {path}  {first}")
    return EXIT_OK
