"""Where a study's wall time goes: training steps vs Ray/Tune/Train start-up, validation, tracking.

Reads a finished study back from MLflow (no re-run) and prints, per trial and in total, the time
spent inside training iterations (``train_seconds``, measured by the workers) against the study's
wall time (measured by the driver).

    python benchmarks/study_overhead.py quick --tracking-uri sqlite:///$PWD/mlflow.db
"""

from __future__ import annotations

import argparse
import statistics


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("study")
    parser.add_argument("--tracking-uri")
    args = parser.parse_args()

    from ldct.tracking import runs as tracking_runs
    from ldct.tracking import store as tracking_store

    client = tracking_store.client(args.tracking_uri)
    parent = tracking_runs.study_run(client, args.study)
    if parent is None:
        raise SystemExit(f"no study {args.study!r} in {client.tracking_uri}")
    wall = parent.data.metrics.get("study_wall_seconds")
    runs = sorted(tracking_runs.trial_runs(client, args.study), key=lambda r: r.info.start_time)
    print(f"study {args.study}: {len(runs)} trials")
    print(f"{'trial':<10} {'status':<10} {'steps':>6} {'run [s]':>9} {'train [s]':>10} {'share':>7}")
    durations, shares, total_train = [], [], 0.0
    for run in runs:
        history = (
            client.get_metric_history(run.info.run_id, "train_seconds")
            if "train_seconds" in run.data.metrics
            else []
        )
        train = max((m.value for m in history), default=0.0)
        steps = int(run.data.metrics.get("step", 0))
        seconds = ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000
        durations.append(seconds)
        total_train += train
        share = train / seconds if seconds > 0 else 0.0
        shares.append(share)
        print(
            f"{run.data.tags.get(tracking_store.TAG_TRIAL, '?'):<10} {run.data.tags.get('ldct.status', '?'):<10} "
            f"{steps:>6} {seconds:>9.1f} {train:>10.1f} {100 * share:>6.0f}%"
        )
    print(
        f"median trial: {statistics.median(durations):.1f} s, median training share {100 * statistics.median(shares):.0f} %"
    )
    if wall:
        print(
            f"study wall time {wall / 60:.1f} min; training steps {total_train / 60:.1f} min "
            f"= {100 * total_train / wall:.0f} % of it; the rest is Ray/Tune/Train start-up, validation, "
            f"checkpointing and MLflow ({(wall - total_train) / 60:.1f} min)"
        )


if __name__ == "__main__":
    main()
