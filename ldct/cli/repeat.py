"""``ldct repeat`` / ``studies/repeat.py``: a configuration trained with N seeds, mean ± std on test."""

from __future__ import annotations

import argparse
import sys

from ldct.cli.study import choose_profile
from ldct.config import ConfigError, list_profiles, load_config
from ldct.errors import TrainingError
from ldct.study.repeat import PAPER_ARM, SOURCE_ARM, run_repeat, source_config
from ldct.study.repeat_report import write_report
from ldct.study.space import paper_label
from ldct.tracking.store import TrackingError, check_reachable, resolve_tracking_uri


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``ldct repeat`` / ``python studies/repeat.py``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--study", help="repeat this study's best trial configuration")
    src.add_argument(
        "--model-version",
        "--version",
        dest="version",
        help="repeat this registered ldct-denoiser version's configuration",
    )
    src.add_argument("--alias", help="repeat the registered version behind this alias (e.g. candidate)")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5; the paper: 10)")
    parser.add_argument(
        "--also", action="append", default=[], choices=[PAPER_ARM], help="also repeat the paper's λ's and lr"
    )
    parser.add_argument(
        "--profile", help="budget and data (default: the source's own profile, else quick/paper as the study)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument("--storage", help="Ray storage for the runs (default ./runs; shared on a cluster)")
    parser.add_argument("--results", default="results", help="where the report goes (default ./results)")
    args = parser.parse_args(argv)

    try:
        uri = resolve_tracking_uri(args.tracking_uri)
        check_reachable(uri)
        label, source = source_config(uri, study=args.study, version=args.version, alias=args.alias)
        profile = args.profile or (
            source.get("profile")
            if source.get("profile") in list_profiles()
            else choose_profile(None, parser.prog)
        )
        cfg = load_config(profile, args.overrides)
        result = run_repeat(
            cfg,
            label,
            source,
            seeds=args.seeds,
            also_paper=PAPER_ARM in args.also,
            tracking_uri=uri,
            storage=args.storage,
        )
    except (ConfigError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except (TrainingError, TrackingError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    arm_labels = {SOURCE_ARM: f"{label} configuration", PAPER_ARM: paper_label(cfg.profile)}
    out = write_report(result, cfg, args.results, arm_labels)
    print((out / "repeat.md").read_text())
    print(f"report: {out}")
    done = sum(r["test"] is not None for r in result.runs)
    return 0 if done == len(result.runs) else 1


def cmd_repeat(args: argparse.Namespace) -> int:
    return main(args.passthrough_args, prog="ldct repeat")
