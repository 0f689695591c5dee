"""``ldct repeat`` / ``studies/repeat.py``: a configuration trained with N seeds (mean ± std on test),
or, with ``--protocol loso``, each real built-in slice held out once (the confirmatory protocol).

Arms (``--also``, all at the tuned lr): paper-matched (the paper's λ's), l1, l1+perceptual,
l1+adv, all (= the tuned arm), redcnn. ``--also paper`` (λ's and lr changed together) is retired.
"""

from __future__ import annotations

import argparse
import sys

from ldct.cli.parsers import build_repeat_parser
from ldct.cli.study import choose_profile
from ldct.config import ConfigError, list_profiles, load_config
from ldct.errors import TrainingError
from ldct.study import loso_report
from ldct.study.arms import LABELS, PAPER_MATCHED_ARM, TUNED_ARM, parse_also
from ldct.study.loso import run_loso
from ldct.study.repeat import run_repeat, source_config
from ldct.study.repeat_report import write_report
from ldct.tracking.store import TrackingError, check_reachable, resolve_tracking_uri


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``ldct repeat`` / ``python studies/repeat.py``; returns the exit code."""
    parser = build_repeat_parser(prog, __doc__)
    args = parser.parse_args(argv)

    try:
        also = parse_also(args.also)
        uri = resolve_tracking_uri(args.tracking_uri)
        check_reachable(uri)
        label, source = source_config(uri, study=args.study, version=args.version, alias=args.alias)
        redcnn = source_config(uri, study=args.redcnn_study)[1] if args.redcnn_study else None
        profile = args.profile or (
            source.get("profile")
            if source.get("profile") in list_profiles()
            else choose_profile(None, parser.prog)
        )
        cfg = load_config(profile, args.overrides)
        common = {
            "also": also,
            "retune_lr": args.retune_lr,
            "redcnn_source": redcnn,
            "tracking_uri": uri,
            "storage": args.storage,
        }
        if args.protocol == "loso":
            result = run_loso(
                cfg, label, source, folds=args.folds, seeds=1 if args.seeds is None else args.seeds,
                realizations_per_slice=4 if args.realizations is None else args.realizations,
                bm3d=not args.no_bm3d, **common,
            )  # fmt: skip
        else:
            if args.folds or args.no_bm3d or args.realizations is not None:
                raise ConfigError("--folds, --realizations and --no-bm3d are for --protocol loso")
            result = run_repeat(cfg, label, source, seeds=5 if args.seeds is None else args.seeds, **common)
    except (ConfigError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except (TrainingError, TrackingError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    if args.protocol == "loso":
        out = loso_report.write_report(result, cfg, args.results)
    else:
        arm_labels = {
            **LABELS,
            TUNED_ARM: f"{label} configuration",
            PAPER_MATCHED_ARM: LABELS[PAPER_MATCHED_ARM],
        }
        out = write_report(result, cfg, args.results, arm_labels)
    print((out / "repeat.md").read_text())
    print(f"report: {out}")
    done = sum(r["test"] is not None for r in result.runs)
    return 0 if done == len(result.runs) else 1


def cmd_repeat(args: argparse.Namespace) -> int:
    return main(args.passthrough_args, prog="ldct repeat")
