"""The MLflow writers that run inside Ray: the study's Tune callback and ``ldct train``'s Train callback.

Only the driver writes to MLflow (through :class:`MLflowStudyCallback`, a Tune callback that lives
in the driver process), so each run has exactly one writer and DDP ranks never touch MLflow.
Tune pickles its callbacks with the experiment: the class stays importable as
``ldct.tracking.MLflowStudyCallback`` (its path before 0.2), so a study started earlier resumes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ldct.losses import RANDOM_PERCEPTUAL_NOTE
from ldct.tracking.runs import (
    checkpoint_uri,
    flat_trial_config,
    log_checkpoint,
    metrics_of,
    provenance_tags,
    trial_run_name,
    trial_status,
)
from ldct.tracking.store import (
    BEST_METRIC,
    LEGACY_BEST_METRIC,
    PARENT_TAG,
    TAG_ROLE,
    TAG_STUDY,
    TAG_TRIAL,
    client,
    experiment_id_of,
    find_run,
    log_params,
)


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
        checkpoint: str = "best",
    ):
        if checkpoint not in ("best", "last"):
            raise ValueError(f"checkpoint {checkpoint!r}: 'best' or 'last'")
        self.tracking_uri = tracking_uri
        # Which checkpoint becomes the run's artifact (and so what a registration loads): the best
        # by the objective, or the last one, where a multi-objective study measured its
        # objectives (FPS and image quality are taken after the last step).
        self.checkpoint = checkpoint
        # The study's storage URI: Ray reports a checkpoint's path without its scheme (s3://).
        self.storage = storage
        self.study = study
        self.parent_run_id = parent_run_id
        self.extra_params = extra_params
        self._runs: dict[str, str] = {}
        self._best: dict[str, tuple[float, str | None]] = {}
        self._best_legacy: dict[str, float] = {}
        self._last_step: dict[str, int] = {}
        self._last_checkpoint: dict[str, tuple[str, int]] = {}  # URI and step of the latest
        self._client: Any = None

    def _mlflow(self) -> Any:
        if self._client is None:
            self._client = client(self.tracking_uri)
        return self._client

    def run_id_for(self, trial: Any) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        mlflow_client = self._mlflow()
        experiment_id = experiment_id_of(mlflow_client, self.study)
        # Scoped to this invocation's parent: a trial id may recur in another study of this name.
        existing = find_run(
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
            self._mlflow().set_tag(run_id, "ldct.perceptual", RANDOM_PERCEPTUAL_NOTE)
        if result.get("fps_device"):
            self._mlflow().set_tag(run_id, "ldct.fps_device", str(result["fps_device"]))
        if result.get("resumed_from_step"):
            # A Ray Train retry restored a checkpoint inside this trial (same run, same trial id).
            self._mlflow().set_tag(run_id, "ldct.resumed_from_step", str(int(result["resumed_from_step"])))
        if result.get("checkpoint_path"):
            self._last_checkpoint[trial.trial_id] = (
                checkpoint_uri(result["checkpoint_path"], self.storage),
                self._last_step[trial.trial_id],
            )
        # The trial's best checkpoint by the objective (VAL_METRIC = val_psnr_body), and the best
        # whole-slice window PSNR beside it (the metric's old meaning, kept for older readers).
        value = result.get(BEST_METRIC.removeprefix("best_"))
        if value is not None and value > self._best.get(trial.trial_id, (-math.inf, None))[0]:
            path = result.get("checkpoint_path")
            self._best[trial.trial_id] = (float(value), checkpoint_uri(path, self.storage) if path else None)
        legacy = result.get(LEGACY_BEST_METRIC.removeprefix("best_"))
        if legacy is not None:
            self._best_legacy[trial.trial_id] = max(
                float(legacy), self._best_legacy.get(trial.trial_id, -math.inf)
            )

    def _finish(self, trial: Any, status: str, error: str | None = None) -> None:
        mlflow_client = self._mlflow()
        run_id = self.run_id_for(trial)
        best_value, checkpoint_path = self._best.get(trial.trial_id, (-math.inf, None))
        if math.isfinite(best_value):
            mlflow_client.log_metric(run_id, BEST_METRIC, best_value)
        legacy = self._best_legacy.get(trial.trial_id, -math.inf)
        if math.isfinite(legacy):
            mlflow_client.log_metric(run_id, LEGACY_BEST_METRIC, legacy)
        if self.checkpoint == "last":
            checkpoint_path, step = self._last_checkpoint.get(trial.trial_id, (None, 0))
            mlflow_client.set_tag(run_id, "ldct.checkpoint", f"last (step {step})")
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
        self._finish(trial, trial_status(False, self._last_step.get(trial.trial_id), iterations))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "failed", error=_summarise_error(trial))

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment; an MLflow client must not travel along.
        return {**self.__dict__, "_client": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A study pickled before _best_legacy existed resumes with it empty.
        self.__dict__.update({"_best_legacy": {}, **state})


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


def _summarise_error(trial: Any) -> str:
    path = getattr(trial, "error_file", None) or getattr(
        getattr(trial, "run_metadata", None), "error_filename", None
    )
    try:
        if path and Path(path).is_file():
            return summarise_error_text(Path(path).read_text())
    except OSError:
        pass
    return "trial failed (see the Ray trial's error file)"


def summarise_error_text(text: str) -> str:
    """The line of a Ray trial's error file that says why the trial failed.

    The file holds the chained traceback: Train V2's ``WorkerGroupError`` text, which keeps only
    the first and last 500 characters of each worker's traceback (so the line naming the loss and
    step may end in ``...`` mid-message, and where depends on the length of the paths in it),
    then the worker's own exception re-raised whole (``ldct.training.ray_train.fit``). The last
    complete line that names an ldct training error wins; a cut line only when nothing else does.
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "trial failed (its Ray error file is empty)"
    # Exception lines ("ldct.errors.TrainingError: ...") and ldct's own log lines, not the
    # traceback's code lines ("raise NonFiniteLossError(step, ...)"), which name the errors too.
    named = [
        [ln for ln in lines if f"{marker}: " in ln] for marker in ("NonFiniteLossError", "TrainingError")
    ] + [[ln for ln in lines if "non-finite" in ln and not ln.startswith("raise ")]]
    for found in named:
        whole = [ln for ln in found if not ln.endswith("...")]
        if whole:
            return whole[-1]
    cut = [ln for found in named for ln in found]
    return cut[-1] if cut else lines[-1]
