"""``ldct eval`` (every method on one split) and ``ldct report`` (a study's report, again)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ldct.cli.common import EXIT_OK
from ldct.config import load_config
from ldct.data.cache import ensure_data
from ldct.evaluation import tables
from ldct.registry.load import load_denoiser
from ldct.study.report import write_report


def cmd_report(args: argparse.Namespace) -> int:
    cfg = load_config(args.profile) if args.profile else None
    out = write_report(args.study, tracking_uri=args.tracking_uri, results_root=args.out, cfg=cfg)
    print((out / "leaderboard.md").read_text())
    print(f"written: {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    tune_crop, window = 0, "auto"
    if args.data:
        cache = Path(args.data)
        if not (cache / "manifest.json").is_file():
            raise FileNotFoundError(
                f"{cache} is not a cache (no manifest.json): make one with `ldct data index ROOT --cache {cache}`"
            )
    else:
        data_cfg = load_config(args.profile or "quick").data
        cache, _ = ensure_data(data_cfg)
        tune_crop, window = data_cfg.tune_crop, data_cfg.window
    denoiser, label = None, "model"
    if args.model or args.model_version or args.checkpoint or args.onnx:
        denoiser, label = load_denoiser(
            model=args.model,
            version=args.model_version,
            checkpoint=args.checkpoint,
            onnx=args.onnx,
            tracking_uri=args.tracking_uri,
        )
    kwargs: dict[str, Any] = {"tune_crop": tune_crop if args.tune_crop is None else args.tune_crop}
    if args.tune_slices is not None:
        kwargs["tune_slices"] = args.tune_slices
    table = tables.evaluate_cache(
        cache,
        args.split,
        denoiser=denoiser,
        model_label=label,
        bm3d=not args.no_bm3d,
        window=args.window or window,
        progress=not args.quiet and sys.stderr.isatty(),
        **kwargs,
    )
    print(json.dumps(table, indent=1) if args.json else tables.format_eval(table))
    return EXIT_OK
