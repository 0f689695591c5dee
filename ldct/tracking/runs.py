"""MLflow runs of studies, trials and ``ldct train``: creating, naming, provenance, finding them.

Runs are found again by tags (``ldct.study``, ``ldct.trial_id``, ``mlflow.parentRunId``), which is
what lets a resumed study continue the same runs instead of creating new ones, and keeps a study
resubmitted under the same name apart from the earlier invocation.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import ldct
from ldct.hyperparams import TUNED
from ldct.tracking.store import (
    BEST_METRIC,
    LEGACY_BEST_METRIC,
    PARENT_TAG,
    TAG_ROLE,
    TAG_STUDY,
    TrackingError,
    client,
    describe_store,
    ensure_experiment,
    experiment_id_of,
    find_run,
    log_params,
)
from ldct.training.checkpoint import CHECKPOINT_FILE, load_state
from ldct.training.loop import PANEL_FILE


def start_study_run(mlflow_client: Any, study: str, flat_config: dict[str, Any], resume: bool) -> str:
    """The study's parent run: created, or (on resume) found again by its tags."""
    experiment_id = experiment_id_of(mlflow_client, study)
    print(describe_store(mlflow_client, study), flush=True)
    existing = find_run(mlflow_client, experiment_id, **{TAG_STUDY: study, TAG_ROLE: "study"})
    if existing is not None and resume:
        mlflow_client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    run = mlflow_client.create_run(
        experiment_id,
        run_name=study,
        tags={TAG_STUDY: study, TAG_ROLE: "study", **provenance_tags(flat_config)},
    )
    log_params(mlflow_client, run.info.run_id, {**flat_config, "data.source": data_source(flat_config)})
    return run.info.run_id


def trial_run_name(trial_id: str, config: dict[str, Any]) -> str:
    """``<trial id> λ3=.. λadv=.. λgp=.. lr=..``: the runs table then reads as the comparison."""
    parts = [f"{t.short}={float(config[t.key]):.3g}" for t in TUNED if t.key in config]
    return " ".join([trial_id, *parts])


def data_source(flat_config: dict[str, Any]) -> str:
    """Where a run's data came from: the built-in simulated set, a DICOM root or a cache."""
    if flat_config.get("data.root"):
        return f"dicom:{flat_config['data.root']}"
    if flat_config.get("data.cache"):
        return f"cache:{flat_config['data.cache']}"
    return "builtin-simulated"


def git_commit() -> str:
    """The commit of the ldct code that runs (``+dirty`` with local changes), or "unknown"."""
    import subprocess

    root = Path(ldct.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance_tags(flat_config: dict[str, Any]) -> dict[str, str]:
    """Git commit (MLflow's own tag too, so the UI shows it) and data source of a run."""
    commit = git_commit()
    return {
        "mlflow.source.git.commit": commit.removesuffix("+dirty"),
        "ldct.git_commit": commit,
        "ldct.data_source": flat_config.get("data.source") or data_source(flat_config),
    }


def metrics_of(result: dict[str, Any], now_ms: int | None = None) -> list[Any]:
    """The loggable numbers of one validation report, as MLflow Metrics at its training step."""
    from mlflow.entities import Metric

    step = int(result.get("step", result.get("training_iteration", 0)))
    now = now_ms or int(time.time() * 1000)
    return [
        Metric(k, float(v), now, step)
        for k, v in result.items()
        if isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(float(v))
        and (k.startswith(("val_", "train_", "iq_")) or k in ("it_per_s", "step", "resumed_from_step", "fps"))
    ]


def start_training_run(tracking_uri: str | None, flat_config: dict[str, Any], name: str) -> tuple[str, str]:
    """An MLflow run for one `ldct train` (experiment ``ldct/train``): (resolved URI, run id)."""
    mlflow_client = client(tracking_uri)
    experiment_id = ensure_experiment(mlflow_client, "ldct/train")
    params = {**flat_config, "data.source": data_source(flat_config)}
    run = mlflow_client.create_run(
        experiment_id,
        run_name=name,
        tags={
            TAG_ROLE: "train",
            "ldct.profile": str(flat_config.get("profile", "")),
            **provenance_tags(params),
        },
    )
    log_params(mlflow_client, run.info.run_id, params)
    return mlflow_client.tracking_uri, run.info.run_id


def log_reports(tracking_uri: str, run_id: str, reports: list[dict[str, Any]]) -> None:
    """Per-validation metrics of a finished in-process run, in log_batch calls of 1000."""
    metrics = [m for report in reports for m in metrics_of(report)]
    mlflow_client = client(tracking_uri)
    for start in range(0, len(metrics), 1000):
        mlflow_client.log_batch(run_id, metrics=metrics[start : start + 1000])


def finish_training_run(
    tracking_uri: str,
    run_id: str,
    best_dir: Path | None,
    table: dict[str, dict[str, float]] | None,
    error: str | None = None,
) -> None:
    """Best checkpoint (+ panel) and the test-split table into the run, then end it."""
    mlflow_client = client(tracking_uri)
    if best_dir is not None:
        log_checkpoint_dir(mlflow_client, run_id, Path(best_dir))
    if table:
        log_test_table(mlflow_client, run_id, table)
    if error:
        mlflow_client.set_tag(run_id, "ldct.error", error[:5000])
    mlflow_client.set_terminated(run_id, status="FAILED" if error else "FINISHED")


def log_test_table(mlflow_client: Any, run_id: str, table: dict[str, dict[str, float]]) -> None:
    """The test-split table: metrics ``test_<row>_<metric>`` plus ``test_table.json``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(f"test_{row}_{name}", float(value), now, 0)
        for row, values in table.items()
        for name, value in values.items()
        if isinstance(value, int | float) and math.isfinite(float(value))
    ]
    mlflow_client.log_batch(run_id, metrics=metrics)
    mlflow_client.log_dict(run_id, {k: dict(v) for k, v in table.items()}, "test_table.json")


def log_report(
    mlflow_client: Any,
    study: str,
    out_dir: Path,
    test_table: dict[str, Any] | None,
    parent_run_id: str | None = None,
) -> str | None:
    """A study report (leaderboard, plots, panel) and its test table onto the study's parent run
    (``parent_run_id``, default the latest invocation's)."""
    parent = study_run(mlflow_client, study, parent_run_id)
    if parent is None:
        return None
    mlflow_client.log_artifacts(parent.info.run_id, str(out_dir), artifact_path="report")
    if test_table:
        log_test_table(mlflow_client, parent.info.run_id, test_table)
    return parent.info.run_id


def flat_trial_config(config: dict[str, Any]) -> dict[str, Any]:
    """The params a trial ran with: the sampled hyperparameters (flat keys)."""
    return {k: v for k, v in config.items() if isinstance(v, int | float | str | bool)}


def checkpoint_uri(path: str, storage: str | None) -> str:
    """A checkpoint path as Ray reports it (``bucket/prefix/...`` on S3) as a URI of the study's
    storage (``s3://bucket/prefix/...?query``), so that it is read from there and not from local disk."""
    if "://" in path or not storage or "://" not in storage or storage.startswith("file://"):
        return path
    scheme = storage.split("://", 1)[0]
    query = storage.partition("?")[2]
    return f"{scheme}://{path.lstrip('/')}" + (f"?{query}" if query else "")


def log_checkpoint(mlflow_client: Any, run_id: str, checkpoint_path: str) -> None:
    """Copy a (possibly remote) Ray checkpoint into the run: ``checkpoint/`` plus ``panel.png``."""
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="ldct-artifact-") as tmp:
        local = Path(tmp) / "checkpoint"
        Checkpoint(checkpoint_path).to_directory(str(local))
        log_checkpoint_dir(mlflow_client, run_id, local)


def log_checkpoint_dir(mlflow_client: Any, run_id: str, directory: Path) -> None:
    """A local checkpoint directory into the run: ``checkpoint/``, ``panel.png`` beside it, and the
    params it was trained with that the config does not show (perceptual weights used, best step)."""
    mlflow_client.log_artifacts(run_id, str(directory), artifact_path="checkpoint")
    if (directory / PANEL_FILE).is_file():
        mlflow_client.log_artifact(run_id, str(directory / PANEL_FILE))
    state = load_state(directory / CHECKPOINT_FILE)
    log_params(
        mlflow_client,
        run_id,
        {"loss.perceptual_weights_used": state.get("perceptual_weights"), "best_step": state.get("step")},
    )


def trial_runs(mlflow_client: Any, study: str, parent_run_id: str | None = None) -> list[Any]:
    """The trial runs of one invocation of ``study``: those nested under ``parent_run_id``, by
    default under the study's latest parent run. Never every run of the experiment: a study
    resubmitted under the same name (e.g. as a Ray Job) would mix in another invocation's trials.
    """
    experiment = mlflow_client.get_experiment_by_name(f"ldct/{study}")
    if experiment is None:
        return []
    if parent_run_id is None:
        parent = study_run(mlflow_client, study)
        if parent is None:
            return []
        parent_run_id = parent.info.run_id
    return mlflow_client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"tags.`{TAG_STUDY}` = '{study}' and tags.`{TAG_ROLE}` = 'trial' "
            f"and tags.`{PARENT_TAG}` = '{parent_run_id}'"
        ),
        max_results=5000,
    )


def study_run(mlflow_client: Any, study: str, parent_run_id: str | None = None) -> Any | None:
    """The parent run ``parent_run_id`` if given, else the latest parent run of ``study``."""
    if parent_run_id is not None:
        return mlflow_client.get_run(parent_run_id)
    experiment = mlflow_client.get_experiment_by_name(f"ldct/{study}")
    if experiment is None:
        return None
    return find_run(mlflow_client, experiment.experiment_id, **{TAG_STUDY: study, TAG_ROLE: "study"})


def best_trial_run(mlflow_client: Any, study: str, parent_run_id: str | None = None) -> Any:
    """The best completed trial of one study invocation (see :func:`trial_runs`), by
    :data:`BEST_METRIC` (psnr_body); a study logged before the body metrics, by its
    :data:`LEGACY_BEST_METRIC`."""
    runs = [
        r
        for r in trial_runs(mlflow_client, study, parent_run_id)
        if r.data.tags.get("ldct.status") == "completed"
        and (BEST_METRIC in r.data.metrics or LEGACY_BEST_METRIC in r.data.metrics)
    ]
    if not runs:
        where = f" under parent run {parent_run_id}" if parent_run_id else ""
        raise TrackingError(
            f"study {study!r} has no completed trial with a validation metric{where} in MLflow"
        )
    key = BEST_METRIC if all(BEST_METRIC in r.data.metrics for r in runs) else LEGACY_BEST_METRIC
    return max(runs, key=lambda r: r.data.metrics.get(key, -math.inf))


def trial_status(failed: bool, last_step: int | float | None, iterations: int) -> str:
    """ "failed", "stopped" (by ASHA: it ended without error before ``train.iterations``) or
    "completed": the one classification the MLflow tag ``ldct.status``, the study's rows and the
    report all use."""
    if failed:
        return "failed"
    if iterations > 0 and last_step is not None and int(last_step) < iterations:
        return "stopped"
    return "completed"


def download_state(mlflow_client: Any, run_id: str) -> dict[str, Any]:
    """The training checkpoint a trial run holds (``checkpoint/state.pt``), loaded weights-only.

    The one way every stage reads a run's checkpoint (registration, migration, repeats, reports):
    a run without one raises TrackingError naming the run.
    """
    with tempfile.TemporaryDirectory(prefix="ldct-run-state-") as tmp:
        try:
            local = mlflow_client.download_artifacts(run_id, f"checkpoint/{CHECKPOINT_FILE}", tmp)
        except Exception as exc:  # noqa: BLE001 - any store error means the same thing here
            raise TrackingError(
                f"run {run_id} holds no checkpoint/{CHECKPOINT_FILE} ({exc}); rerun the study"
            ) from exc
        return load_state(local)
