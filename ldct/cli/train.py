"""``ldct train``: one training run (in-process or on Ray Train), then the test table."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from ldct.cli.common import debug_enabled
from ldct.cluster import root_cause, storage_uri
from ldct.config import Config, apply_overrides, load_config, replace, to_flat
from ldct.errors import TrainingError
from ldct.evaluation.tables import evaluate_generator, format_eval, mean_rows
from ldct.study.preflight import report
from ldct.tracking import runs as tracking_runs
from ldct.tracking.callbacks import train_callback
from ldct.training.checkpoint import generator_from_state, load_state
from ldct.training.loop import VAL_METRIC, run_local
from ldct.training.ray_train import run_with_ray


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.profile, args.overrides)
    if args.data:
        cfg = apply_overrides(cfg, [f"data.cache={Path(args.data).resolve()}"])
    if args.check:
        return report(cfg, storage=args.storage, tracking_uri=args.tracking_uri)
    return main_train(
        cfg, workers=args.workers, json_out=args.json, storage=args.storage, tracking_uri=args.tracking_uri
    )


def main_train(
    cfg: Config,
    workers: int | None,
    json_out: bool,
    storage: str | None = None,
    tracking_uri: str | None = None,
) -> int:
    """``ldct train``: one run, then the test table. workers=0 trains in this process.

    With a tracking URI (given, or MLFLOW_TRACKING_URI) the run is logged to MLflow experiment
    ``ldct/train``: params, every validation, the best checkpoint and the test table.
    """
    if workers is not None:
        cfg = replace(cfg, train={"workers": max(workers, 1)})
    storage_path = storage_uri(storage or os.environ.get("LDCT_RUNS"))
    started = time.perf_counter()
    name = f"train-{cfg.profile}-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = run_id = None
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        uri, run_id = tracking_runs.start_training_run(tracking_uri, to_flat(cfg), name)
        print(f"[ldct] MLflow run {run_id} in {uri} (experiment ldct/train)", flush=True)
    try:
        if workers == 0:
            if "://" in storage_path:
                raise TrainingError(
                    f"--workers 0 trains without Ray and needs a local --storage, not {storage_path}"
                )
            session = run_local(cfg, checkpoint_root=Path(storage_path) / f"local-{cfg.profile}")
            best = max(session.reports, key=lambda r: r.get(VAL_METRIC, -math.inf))
            best_dir = next(p for p in session.checkpoints if p.name.endswith(f"{int(best['step']):07d}"))
            if run_id:
                tracking_runs.log_reports(uri, run_id, session.reports)
        else:
            callbacks = [train_callback(uri, run_id)] if run_id else None
            result = run_with_ray(cfg, storage_path, name=name, callbacks=callbacks)
            if result.error is not None:
                raise result.error
            best_checkpoint = result.best_checkpoints[0][0] if result.best_checkpoints else result.checkpoint
            best_dir = Path(tempfile.mkdtemp(prefix="ldct-best-"))
            best_checkpoint.to_directory(str(best_dir))
    except Exception as exc:  # noqa: BLE001 - one clear line, then the traceback for the curious
        if debug_enabled():  # `ldct --debug` / LDCT_DEBUG=1
            import traceback

            traceback.print_exc(file=sys.stderr)
        print(f"ldct train: failed: {root_cause(exc)}", file=sys.stderr)
        if run_id:
            tracking_runs.finish_training_run(uri, run_id, None, None, error=root_cause(exc))
        return 1
    generator, _ = generator_from_state(load_state(best_dir))

    full_table = evaluate_generator(generator, cfg, progress=sys.stderr.isatty())
    table = mean_rows(full_table)
    minutes = (time.perf_counter() - started) / 60
    if run_id:
        tracking_runs.finish_training_run(uri, run_id, best_dir, table)
    print(f"\nTest split ({cfg.profile} profile, best checkpoint {best_dir}, {minutes:.1f} min):")
    print(format_eval(full_table))
    if json_out:
        print(json.dumps({k: {m: float(v) for m, v in row.items()} for k, row in table.items()}))
    return 0
