"""MLflow: one parent run per study, one nested run per trial, the model registry and its aliases.

Only the study driver writes to MLflow (through :class:`MLflowStudyCallback`, a Tune callback
that lives in the driver process), so each run has exactly one writer and DDP ranks never touch
MLflow. Runs are found again by tags (``ldct.study``, ``ldct.trial_id``), which is what lets a
resumed study continue the same runs instead of creating new ones.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

MODEL_NAME = "ldct-denoiser"
CANDIDATE = "candidate"
CHAMPION = "champion"
TAG_STUDY = "ldct.study"
TAG_ROLE = "ldct.role"
TAG_TRIAL = "ldct.trial_id"
PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment of this kind on its runs table, not on the GenAI overview.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
TUNED_PARAMS = ("loss.lambda_l1", "loss.lambda_perceptual", "loss.lambda_gp", "optim.lr")


class TrackingError(RuntimeError):
    """MLflow cannot be reached or holds nothing to act on; the message says what to do."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Explicit URI > MLFLOW_TRACKING_URI > an absolute SQLite file in the working directory.

    Absolute, because Ray trials run in their own working directories (DESIGN.md §5a).
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with what to do, when an MLflow server URI does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(
            f"MLflow server {uri} is unreachable ({exc}). Start it (e.g. `mlflow server --host 127.0.0.1 "
            f"--port 5000 --backend-store-uri sqlite:///mlflow.db`), or pass --tracking-uri / unset "
            f"MLFLOW_TRACKING_URI to use a local SQLite store."
        ) from exc


def client(uri: str | None = None) -> Any:
    import mlflow
    from mlflow.tracking import MlflowClient

    resolved = resolve_tracking_uri(uri)
    check_reachable(resolved)
    mlflow.set_tracking_uri(resolved)
    return MlflowClient(tracking_uri=resolved)


def artifact_root(uri: str) -> str | None:
    """Default artifact root of a store: ``mlartifacts/`` beside a SQLite file, never the cwd.

    MLflow's own default for a SQLite store is ``./mlruns`` of whatever directory the process runs
    in (trials chdir, tests run from the repository). A server decides for itself (None).
    """
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


def ensure_experiment(mlflow_client: Any, name: str) -> str:
    """The id of experiment ``name``, created with its artifacts under :func:`artifact_root`."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = artifact_root(mlflow_client.tracking_uri)
    location = f"{root}/{name.replace('/', '_')}" if root else None
    return mlflow_client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)


def _experiment_id(mlflow_client: Any, study: str) -> str:
    return ensure_experiment(mlflow_client, f"ldct/{study}")


def _find_run(mlflow_client: Any, experiment_id: str, **tags: str) -> Any | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = mlflow_client.search_runs(
        [experiment_id], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"]
    )
    return runs[0] if runs else None


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:6000]


def ui_url(tracking_uri: str, experiment_id: str, base: str | None = None) -> str:
    """The MLflow UI page that shows a study's trials as a comparison.

    MLflow 3.17 opens an experiment on its GenAI overview unless the ``workflowType`` URL
    parameter (or the browser's remembered sidebar switch) says "machine_learning"; the
    experiment tag ``mlflow.experimentKind`` alone does not change that (checked in Chromium).
    The filter keeps the trial runs only, so they are listed flat (not collapsed under the
    parent), best validation PSNR first.
    """
    from urllib.parse import quote

    if base is None:
        base = tracking_uri if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    query = "&".join(
        [
            "workflowType=machine_learning",
            "searchFilter=" + quote(f"tags.`{TAG_ROLE}` = 'trial'"),
            "orderByKey=" + quote("metrics.`best_val_psnr_window`"),
            "orderByAsc=false",
        ]
    )
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def describe_store(mlflow_client: Any, study: str) -> str:
    """Where a study's runs and artifacts are, and the UI link, for the study to print."""
    uri = mlflow_client.tracking_uri
    experiment = mlflow_client.get_experiment_by_name(f"ldct/{study}")
    lines = [f"[ldct] MLflow store {uri}, artifacts {experiment.artifact_location}"]
    if not uri.startswith(("http://", "https://")):
        lines.append(f"[ldct] to compare the trials: mlflow ui --backend-store-uri {uri}  then open")
    else:
        lines.append("[ldct] to compare the trials open")
    lines.append(f"[ldct]   {ui_url(uri, experiment.experiment_id)}")
    return "\n".join(lines)


def start_study_run(mlflow_client: Any, study: str, flat_config: dict[str, Any], resume: bool) -> str:
    """The study's parent run: created, or (on resume) found again by its tags."""
    experiment_id = _experiment_id(mlflow_client, study)
    print(describe_store(mlflow_client, study), flush=True)
    existing = _find_run(mlflow_client, experiment_id, **{TAG_STUDY: study, TAG_ROLE: "study"})
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


def log_params(mlflow_client: Any, run_id: str, params: dict[str, Any]) -> None:
    """All params in log_batch calls of 100 (MLflow's limit), not one round trip each."""
    from mlflow.entities import Param

    items = [Param(str(k), _param_value(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[start : start + 100])


def trial_run_name(trial_id: str, config: dict[str, Any]) -> str:
    """``<trial id> λ2=.. λ3=.. λgp=.. lr=..``: the runs table then reads as the comparison."""
    short = {
        "loss.lambda_l1": "λ2",
        "loss.lambda_perceptual": "λ3",
        "loss.lambda_gp": "λgp",
        "optim.lr": "lr",
    }
    parts = [f"{short[k]}={float(config[k]):.3g}" for k in TUNED_PARAMS if k in config]
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

    import ldct

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


def _ray_callback_base() -> type:
    from ray.tune import Callback

    return Callback


class MLflowStudyCallback(_ray_callback_base()):  # type: ignore[misc]
    """Tune callback (driver process): nested run per trial, metrics per validation, artifacts at the end."""

    def __init__(
        self,
        tracking_uri: str,
        study: str,
        parent_run_id: str,
        extra_params: dict[str, Any],
        storage: str | None = None,
    ):
        self.tracking_uri = tracking_uri
        # The study's storage URI: Ray reports a checkpoint's path without its scheme (s3://).
        self.storage = storage
        self.study = study
        self.parent_run_id = parent_run_id
        self.extra_params = extra_params
        self._runs: dict[str, str] = {}
        self._best: dict[str, tuple[float, str | None]] = {}
        self._last_step: dict[str, int] = {}
        self._client: Any = None

    def _mlflow(self) -> Any:
        if self._client is None:
            self._client = client(self.tracking_uri)
        return self._client

    def run_id_for(self, trial: Any) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        mlflow_client = self._mlflow()
        experiment_id = _experiment_id(mlflow_client, self.study)
        # Scoped to this invocation's parent: a trial id may recur in another study of this name.
        existing = _find_run(
            mlflow_client,
            experiment_id,
            **{TAG_STUDY: self.study, TAG_TRIAL: trial.trial_id, PARENT_TAG: self.parent_run_id},
        )
        if existing is not None:
            run_id = existing.info.run_id
            mlflow_client.update_run(run_id, status="RUNNING")
        else:
            run = mlflow_client.create_run(
                experiment_id,
                run_name=trial_run_name(trial.trial_id, trial.config),
                tags={
                    TAG_STUDY: self.study,
                    TAG_ROLE: "trial",
                    TAG_TRIAL: trial.trial_id,
                    PARENT_TAG: self.parent_run_id,
                    **provenance_tags(self.extra_params),
                },
            )
            run_id = run.info.run_id
            log_params(mlflow_client, run_id, {**self.extra_params, **flat_trial_config(trial.config)})
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.run_id_for(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run_id = self.run_id_for(trial)
        metrics = metrics_of(result)
        if metrics:
            self._mlflow().log_batch(run_id, metrics=metrics)
        self._last_step[trial.trial_id] = int(result.get("step", result.get("training_iteration", 0)))
        if result.get("perceptual_random"):
            from ldct.losses import RANDOM_PERCEPTUAL_NOTE

            self._mlflow().set_tag(run_id, "ldct.perceptual", RANDOM_PERCEPTUAL_NOTE)
        if result.get("fps_device"):
            self._mlflow().set_tag(run_id, "ldct.fps_device", str(result["fps_device"]))
        if result.get("resumed_from_step"):
            # A Ray Train retry restored a checkpoint inside this trial (same run, same trial id).
            self._mlflow().set_tag(run_id, "ldct.resumed_from_step", str(int(result["resumed_from_step"])))
        value = result.get("val_psnr_window")
        if value is not None and value > self._best.get(trial.trial_id, (-math.inf, None))[0]:
            path = result.get("checkpoint_path")
            self._best[trial.trial_id] = (float(value), checkpoint_uri(path, self.storage) if path else None)

    def _finish(self, trial: Any, status: str, error: str | None = None) -> None:
        mlflow_client = self._mlflow()
        run_id = self.run_id_for(trial)
        best_value, checkpoint_path = self._best.get(trial.trial_id, (-math.inf, None))
        if math.isfinite(best_value):
            mlflow_client.log_metric(run_id, "best_val_psnr_window", best_value)
        if checkpoint_path:
            try:
                log_checkpoint(mlflow_client, run_id, checkpoint_path)
            except Exception as exc:  # noqa: BLE001 - a missing artifact must not end the study
                mlflow_client.set_tag(run_id, "ldct.artifact_error", str(exc)[:500])
        if error:
            mlflow_client.set_tag(run_id, "ldct.error", error[:5000])
        mlflow_client.set_tag(run_id, "ldct.status", status)
        mlflow_client.set_terminated(run_id, status="FAILED" if status == "failed" else "FINISHED")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # A trial that ends before train.iterations without an error was stopped by ASHA.
        iterations = int(self.extra_params.get("train.iterations", 0) or 0)
        last = self._last_step.get(trial.trial_id)
        stopped = iterations > 0 and last is not None and last < iterations
        self._finish(trial, "stopped" if stopped else "completed")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "failed", error=_summarise_error(trial))

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment; an MLflow client must not travel along.
        return {**self.__dict__, "_client": None}


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
        and (k.startswith(("val_", "train_")) or k in ("it_per_s", "step", "resumed_from_step", "fps"))
    ]


# ------------------------------------------------------------------------------------ `ldct train` runs


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


def _train_callback_base() -> type:
    from ray.train import UserCallback

    return UserCallback


def train_callback(tracking_uri: str, run_id: str) -> Any:
    """A Ray Train callback (runs in the Train controller) logging every validation to ``run_id``."""

    class MLflowTrainCallback(_train_callback_base()):  # type: ignore[misc]
        def __init__(self) -> None:
            self.tracking_uri, self.run_id, self._client = tracking_uri, run_id, None

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            # Rank 0 carries the validation metrics (the other ranks report the step only).
            values = metrics_of(metrics[0]) if metrics else []
            if values:
                self._client = self._client or client(self.tracking_uri)
                self._client.log_batch(self.run_id, metrics=values)

        def __getstate__(self) -> dict[str, Any]:
            return {**self.__dict__, "_client": None}

    return MLflowTrainCallback()


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
        from ldct.checkpoint import CHECKPOINT_FILE, load_state
        from ldct.train import PANEL_FILE

        mlflow_client.log_artifacts(run_id, str(best_dir), artifact_path="checkpoint")
        if (Path(best_dir) / PANEL_FILE).is_file():
            mlflow_client.log_artifact(run_id, str(Path(best_dir) / PANEL_FILE))
        state = load_state(Path(best_dir) / CHECKPOINT_FILE)
        log_params(
            mlflow_client,
            run_id,
            {"loss.perceptual_weights_used": state.get("perceptual_weights"), "best_step": state.get("step")},
        )
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


def _summarise_error(trial: Any) -> str:
    path = getattr(trial, "error_file", None) or getattr(
        getattr(trial, "run_metadata", None), "error_filename", None
    )
    try:
        if path and Path(path).is_file():
            text = Path(path).read_text()
            for marker in ("NonFiniteLossError", "TrainingError", "non-finite"):
                lines = [ln for ln in text.splitlines() if marker in ln]
                if lines:
                    return lines[-1].strip()
            return text.strip().splitlines()[-1]
    except OSError:
        pass
    return "trial failed (see the Ray trial's error file)"


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

    from ldct.checkpoint import CHECKPOINT_FILE, load_state
    from ldct.train import PANEL_FILE

    with tempfile.TemporaryDirectory(prefix="ldct-artifact-") as tmp:
        local = Path(tmp) / "checkpoint"
        Checkpoint(checkpoint_path).to_directory(str(local))
        mlflow_client.log_artifacts(run_id, str(local), artifact_path="checkpoint")
        if (local / PANEL_FILE).is_file():
            mlflow_client.log_artifact(run_id, str(local / PANEL_FILE))
        state = load_state(local / CHECKPOINT_FILE)
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
    return _find_run(mlflow_client, experiment.experiment_id, **{TAG_STUDY: study, TAG_ROLE: "study"})


def best_trial_run(mlflow_client: Any, study: str, parent_run_id: str | None = None) -> Any:
    """The best completed trial of one study invocation (see :func:`trial_runs`)."""
    runs = [
        r
        for r in trial_runs(mlflow_client, study, parent_run_id)
        if r.data.tags.get("ldct.status") == "completed" and "best_val_psnr_window" in r.data.metrics
    ]
    if not runs:
        where = f" under parent run {parent_run_id}" if parent_run_id else ""
        raise TrackingError(
            f"study {study!r} has no completed trial with a validation metric{where} in MLflow"
        )
    return max(runs, key=lambda r: r.data.metrics["best_val_psnr_window"])


def register_best(
    study: str,
    tracking_uri: str | None = None,
    profile: str = "",
    parent_run_id: str | None = None,
    run: Any | None = None,
) -> Any:
    """Register the best trial of one study invocation (its parent run; default the latest), or
    ``run`` (one of its trial runs), as ``ldct-denoiser`` with alias ``candidate``; returns the
    version."""
    from ldct.checkpoint import CHECKPOINT_FILE, load_state

    mlflow_client = client(tracking_uri)
    best = run if run is not None else best_trial_run(mlflow_client, study, parent_run_id)
    run_id = best.info.run_id
    with tempfile.TemporaryDirectory(prefix="ldct-register-") as tmp:
        local = Path(mlflow_client.download_artifacts(run_id, f"checkpoint/{CHECKPOINT_FILE}", tmp))
        state = load_state(local)
    tags = {"study": study, "trial_id": best.data.tags.get(TAG_TRIAL, "")}
    if parent_run_id:
        tags["study_run_id"] = parent_run_id
    if profile:
        tags["profile"] = profile
    return register_state(state, run_id, tracking_uri, tags=tags)


def register_state(
    state: dict[str, Any],
    run_id: str,
    tracking_uri: str | None = None,
    tags: dict[str, str] | None = None,
    alias: str | None = CANDIDATE,
    onnx: bool | None = None,
) -> Any:
    """Log a checkpoint's generator as a model of ``run_id``, register it and point ``alias`` at it.

    The model is the safe format of ``ldct.serving`` (models-from-code pyfunc, safetensors weights,
    explicit [N, H, W] HU signature, this package as code_paths, the ONNX export as an artifact
    unless ``onnx`` is False; None: as the checkpoint's own ``study.register_onnx`` says).
    """
    import mlflow
    import mlflow.pyfunc

    from ldct import serving
    from ldct.checkpoint import generator_from_state

    mlflow_client = client(tracking_uri)
    generator, cfg = generator_from_state(state)
    if onnx is None:
        onnx = cfg.study.register_onnx
    metadata = {
        "ldct_format": serving.MODEL_FORMAT,
        "normalization": state["normalization"],
        "config": state["config"],
        "metrics": {k: float(v) for k, v in state["metrics"].items() if isinstance(v, int | float)},
        "study": (tags or {}).get("study", ""),
        "trial_run_id": run_id,
        "perceptual_weights": state.get("perceptual_weights", ""),
        "input": "HU slices [N, H, W] float32, any H and W; output: denoised HU, same shape",
    }
    with tempfile.TemporaryDirectory(prefix="ldct-model-") as tmp:
        files = serving.write_model_files(state, Path(tmp) / "files")
        artifacts = {"weights": str(files["weights"]), "spec": str(files["spec"])}
        onnx_error = ""
        if onnx:
            from ldct.deploy.export import export_onnx

            try:
                export_onnx(generator, Path(tmp) / "files" / serving.ONNX_FILE)
                artifacts["onnx"] = str(Path(tmp) / "files" / serving.ONNX_FILE)
            except Exception as exc:  # noqa: BLE001 - the pyfunc model is still worth registering
                onnx_error = f"{type(exc).__name__}: {exc}"[:500]
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(serving.PYFUNC_SCRIPT),
                artifacts=artifacts,
                code_paths=[_package_copy(Path(tmp) / "code")],
                signature=serving.signature(),
                metadata=metadata,
                pip_requirements=_requirements(),
            )
    version = mlflow.register_model(info.model_uri, MODEL_NAME)
    metrics = metadata["metrics"]
    all_tags = {
        "trial_run_id": run_id,
        "profile": cfg.profile,
        "arch": cfg.model.arch,
        "encoder": cfg.model.encoder,
        "format": serving.MODEL_FORMAT,
        **{k: f"{v:.4f}" for k, v in metrics.items() if k.startswith("val_")},
        **({"onnx_error": onnx_error} if onnx_error else {}),
        **(tags or {}),
    }
    for key, value in all_tags.items():
        mlflow_client.set_model_version_tag(MODEL_NAME, version.version, key, str(value))
    mlflow_client.update_registered_model(MODEL_NAME, description=MODEL_DESCRIPTION)
    mlflow_client.update_model_version(
        MODEL_NAME,
        version.version,
        description=_version_description(cfg, metrics, all_tags, "onnx" in artifacts),
    )
    if alias:
        mlflow_client.set_registered_model_alias(MODEL_NAME, alias, version.version)
    return mlflow_client.get_model_version(MODEL_NAME, version.version)


MODEL_DESCRIPTION = (
    "Low-dose CT denoiser (EfficientNetV2-style encoder + decoder, WGAN-GP with L1 and perceptual "
    "losses), trained by the ldct study. Input and output are CT slices in Hounsfield units, "
    "float32 [N, H, W], any H and W; the HU window normalisation is inside the model. Aliases: "
    "`candidate` = best trial of the latest study, `champion` = passed `ldct-best validate` "
    "(FPS at 512x512). Serve: `mlflow models serve -m models:/ldct-denoiser@champion "
    "--env-manager local`; DICOM in/out: `ldct-best denoise`."
)


def _version_description(cfg: Any, metrics: dict[str, float], tags: dict[str, str], onnx: bool) -> str:
    tuned = ", ".join(
        f"{key.split('.')[-1]}={getattr(getattr(cfg, key.split('.')[0]), key.split('.')[1]):.3g}"
        for key in TUNED_PARAMS
    )
    parts = [
        f"study {tags.get('study') or '-'}, trial {tags.get('trial_id') or '-'} (run {tags['trial_run_id']})",
        f"profile {cfg.profile}, encoder {cfg.model.encoder}; {tuned}",
    ]
    if "val_psnr_window" in metrics:
        parts.append(
            f"validation at step {int(metrics.get('step', 0))}: PSNR(window) {metrics['val_psnr_window']:.2f} dB"
            + (
                f" vs LDCT input {metrics['val_ldct_psnr_window']:.2f} dB"
                if "val_ldct_psnr_window" in metrics
                else ""
            )
            + (f", SSIM(window) {metrics['val_ssim_window']:.4f}" if "val_ssim_window" in metrics else "")
        )
    parts.append(
        "files: weights.safetensors + ldct_model.json (safe to load), "
        + ("model.onnx (pad/crop inside, [N,1,H,W] in [0, 1]), " if onnx else "")
        + "pyfunc HU in / HU out"
    )
    return "\n".join(parts)


def _package_copy(target: Path) -> str:
    """This package without caches, for ``code_paths`` (the model then needs no ldct install)."""
    import shutil

    import ldct

    source = Path(ldct.__file__).resolve().parent
    shutil.copytree(source, target / "ldct", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(target / "ldct")


def _requirements() -> list[str]:
    # Given explicitly: MLflow's inference of requirements imports and profiles the model (slow).
    # Only PyPI packages: the ldct code travels in the model's code/ directory.
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "timm", "numpy", "safetensors")]


def resolve_version(mlflow_client: Any, alias: str | None = None, version: str | int | None = None) -> Any:
    """A registry version by number or alias, with an error that lists what exists."""
    from mlflow.exceptions import MlflowException

    try:
        if version is not None:
            return mlflow_client.get_model_version(MODEL_NAME, str(version))
        return mlflow_client.get_model_version_by_alias(MODEL_NAME, alias or CANDIDATE)
    except MlflowException as exc:
        try:
            known = ", ".join(
                f"v{row['version']}" + (f" ({','.join(row['aliases'])})" if row["aliases"] else "")
                for row in list_versions(mlflow_client.tracking_uri)
            )
        except MlflowException:
            known = ""
        what = f"version {version}" if version is not None else f"alias {alias or CANDIDATE!r}"
        raise TrackingError(
            f"model {MODEL_NAME!r} has no {what} in {mlflow_client.tracking_uri}; "
            f"registered: {known or 'none (run a study first)'}"
        ) from exc


def load_registered(
    alias: str | None = None, version: str | int | None = None, tracking_uri: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """Load a registered generator (any batch/image size, [N,1,H,W] in [0, 1]) and its metadata.

    Reads only the version's MLmodel (YAML), ldct_model.json and weights.safetensors: nothing
    from the store is unpickled or executed. A version in the old pickle format is refused with
    the command that re-registers it.
    """
    from ldct import serving

    mlflow_client = client(tracking_uri)
    model_version = resolve_version(mlflow_client, alias, version)
    uri = f"models:/{MODEL_NAME}/{model_version.version}"
    with tempfile.TemporaryDirectory(prefix="ldct-load-") as tmp:
        model_meta = _registered_metadata(uri, str(model_version.version), Path(tmp))
        try:
            weights = _download(f"{uri}/artifacts/{serving.WEIGHTS_FILE}", Path(tmp))
            spec = _download(f"{uri}/artifacts/{serving.SPEC_FILE}", Path(tmp))
            generator, spec_data = serving.read_model_files(weights, spec)
        except Exception as exc:  # noqa: BLE001 - missing file, bad safetensors, bad spec: one answer
            raise TrackingError(
                f"{uri}: its weights/spec are not the safe ldct format ({exc}). "
                f"{_reregister_hint(model_version.version)}"
            ) from exc
    meta = {
        "version": str(model_version.version),
        "run_id": model_version.run_id,
        "aliases": list(model_version.aliases),
        "tags": dict(model_version.tags),
        "normalization": spec_data["normalization"],
        "config": spec_data.get("config", {}),
        "metrics": _metric_rows(model_meta.get("metrics", {})),
        "study": model_meta.get("study", ""),
        "tracking_uri": mlflow_client.tracking_uri,
    }
    return generator, meta


def _download(artifact_uri: str, directory: Path) -> str:
    import mlflow.artifacts

    target = directory / artifact_uri.rsplit("/", 1)[-1].replace(".", "_")
    target.mkdir(parents=True, exist_ok=True)
    return mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(target))


def _reregister_hint(version: str | int) -> str:
    return (
        f"Re-register it in the safe format: `ldct-best migrate --model-version {version}` (reads the "
        f"trial's weights-only checkpoint and registers a new version with the same aliases), or "
        f"rerun the study."
    )


def _registered_metadata(uri: str, version: str | int, tmp: Path) -> dict[str, Any]:
    """The MLmodel metadata of a version (safe YAML); an old or foreign format raises TrackingError."""
    from mlflow.models import Model

    from ldct import serving

    model = Model.load(_download(f"{uri}/MLmodel", tmp))
    meta = model.metadata or {}
    if meta.get("ldct_format") != serving.MODEL_FORMAT:
        flavors = ", ".join(sorted(model.flavors))
        old = "pytorch" in model.flavors
        raise TrackingError(
            f"{uri} is "
            + (
                "in the old pickle format (MLflow pytorch flavour)"
                if old
                else f"not an ldct model ({flavors})"
            )
            + ": ldct refuses to load it, because unpickling a model can run arbitrary code. "
            + _reregister_hint(version)
        )
    return meta


def is_safe_version(mlflow_client: Any, version: str | int) -> bool:
    """True when a version is in the safe ldct format (what :func:`load_registered` accepts)."""
    with tempfile.TemporaryDirectory(prefix="ldct-check-") as tmp:
        try:
            _registered_metadata(f"models:/{MODEL_NAME}/{version}", version, Path(tmp))
        except TrackingError:
            return False
    return True


def migrate(version: str | int, tracking_uri: str | None = None) -> Any:
    """Re-register an old-format version from its trial run's (weights-only) checkpoint.

    The new version gets the old one's tags and aliases; the old one is tagged as superseded.
    Nothing of the old model is loaded.
    """
    from ldct.checkpoint import CHECKPOINT_FILE, load_state

    mlflow_client = client(tracking_uri)
    old = resolve_version(mlflow_client, version=version)
    if is_safe_version(mlflow_client, old.version):
        raise TrackingError(f"version {old.version} of {MODEL_NAME!r} is already in the safe format")
    aliases = [
        a
        for a, v in mlflow_client.get_registered_model(MODEL_NAME).aliases.items()
        if str(v) == str(old.version)
    ]
    with tempfile.TemporaryDirectory(prefix="ldct-migrate-") as tmp:
        try:
            local = mlflow_client.download_artifacts(old.run_id, f"checkpoint/{CHECKPOINT_FILE}", tmp)
        except Exception as exc:  # noqa: BLE001 - any store error means the same thing here
            raise TrackingError(
                f"version {old.version}: its run {old.run_id} holds no checkpoint/{CHECKPOINT_FILE} to "
                f"re-register from ({exc}); rerun the study"
            ) from exc
        state = load_state(local)
    keep = {k: v for k, v in old.tags.items() if k not in ("format",) and not k.startswith("fps")}
    new = register_state(
        state, old.run_id, tracking_uri, tags={**keep, "migrated_from": str(old.version)}, alias=None
    )
    for alias in aliases:
        mlflow_client.set_registered_model_alias(MODEL_NAME, alias, new.version)
    mlflow_client.set_model_version_tag(MODEL_NAME, str(old.version), "superseded_by", str(new.version))
    return mlflow_client.get_model_version(MODEL_NAME, new.version)


def promote(
    version: str, throughput: dict[str, Any], min_fps: float, tracking_uri: str | None = None
) -> None:
    """Move alias ``champion`` to ``version`` and tag it with the measured throughput."""
    mlflow_client = client(tracking_uri)
    tags = {
        "fps": f"{throughput['fps']:.2f}",
        "fps_device": throughput.get("device_name", ""),
        "fps_device_type": throughput.get("device", ""),
        "fps_batch": str(throughput.get("batch", "")),
        "fps_precision": throughput.get("precision", ""),
        "fps_size": str(throughput.get("size", 512)),
        "fps_min_required": f"{min_fps:g}",
        "fps_libraries": json.dumps({k: v for k, v in throughput.items() if k.endswith("_version")}),
        "validated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(MODEL_NAME, str(version), key, str(value))
    mlflow_client.set_registered_model_alias(MODEL_NAME, CHAMPION, str(version))


def record_failed_validation(
    version: str, throughput: dict[str, Any], min_fps: float, tracking_uri: str | None = None
) -> None:
    """Note a failed throughput check on the version (aliases untouched)."""
    mlflow_client = client(tracking_uri)
    mlflow_client.set_model_version_tag(
        MODEL_NAME,
        str(version),
        "fps_last_failed",
        f"{throughput['fps']:.2f} < {min_fps:g} on {throughput.get('device_name', '?')}",
    )


def _model_label(tags: dict[str, str]) -> str:
    from ldct.models import DEFAULT_ARCH

    arch = tags.get("arch", DEFAULT_ARCH)
    return tags.get("encoder", "") if arch == DEFAULT_ARCH else arch


def list_versions(tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Registered versions, newest first, with aliases, validation metrics and FPS."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking_uri)
    try:
        versions = mlflow_client.search_model_versions(f"name = '{MODEL_NAME}'")
    except MlflowException:
        return []
    if not versions:
        # An empty store has no registered model to read aliases from (get_registered_model raises).
        return []
    # search_model_versions leaves `aliases` empty; the registered model holds the mapping.
    by_version: dict[str, list[str]] = {}
    for alias, number in mlflow_client.get_registered_model(MODEL_NAME).aliases.items():
        by_version.setdefault(str(number), []).append(alias)
    rows = []
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        rows.append(
            {
                "version": v.version,
                "aliases": sorted(by_version.get(str(v.version), [])),
                "study": v.tags.get("study", ""),
                "trial": v.tags.get("trial_id", ""),
                "encoder": v.tags.get("encoder", ""),
                # What the version is: its timm encoder, or its architecture where it has none
                # (a RED-CNN version carries model.encoder's unused default in its tags).
                "model": _model_label(v.tags),
                "val_psnr_window": v.tags.get("val_psnr_window", ""),
                "val_ssim_window": v.tags.get("val_ssim_window", ""),
                "fps": v.tags.get("fps", ""),
                "fps_device": v.tags.get("fps_device", ""),
                # Versions from before the safe format carry no tag: `ldct-best migrate` them.
                "format": v.tags.get("format", "old pickle (migrate)"),
                "run_id": v.run_id,
            }
        )
    return rows


def _metric_rows(flat: dict[str, float]) -> dict[str, Any]:
    """Flat ``val_*`` / ``val_ldct_*`` metrics of a checkpoint -> {"validation": {"ldct": .., "denoised": ..}}."""
    from ldct.metrics import METRIC_NAMES

    rows: dict[str, Any] = {
        "validation": {
            "ldct": {m: flat[f"val_ldct_{m}"] for m in METRIC_NAMES if f"val_ldct_{m}" in flat},
            "denoised": {m: flat[f"val_{m}"] for m in METRIC_NAMES if f"val_{m}" in flat},
        }
    }
    if "step" in flat:
        rows["step"] = int(flat["step"])
    return rows
