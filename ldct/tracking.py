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


def _experiment_id(mlflow_client: Any, study: str) -> str:
    name = f"ldct/{study}"
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow_client.create_experiment(name)


def _find_run(mlflow_client: Any, experiment_id: str, **tags: str) -> Any | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = mlflow_client.search_runs(
        [experiment_id], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"]
    )
    return runs[0] if runs else None


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:6000]


def start_study_run(mlflow_client: Any, study: str, flat_config: dict[str, Any], resume: bool) -> str:
    """The study's parent run: created, or (on resume) found again by its tags."""
    experiment_id = _experiment_id(mlflow_client, study)
    existing = _find_run(mlflow_client, experiment_id, **{TAG_STUDY: study, TAG_ROLE: "study"})
    if existing is not None and resume:
        mlflow_client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    run = mlflow_client.create_run(experiment_id, run_name=study, tags={TAG_STUDY: study, TAG_ROLE: "study"})
    for key, value in flat_config.items():
        mlflow_client.log_param(run.info.run_id, key, _param_value(value))
    return run.info.run_id


def _ray_callback_base() -> type:
    from ray.tune import Callback

    return Callback


class MLflowStudyCallback(_ray_callback_base()):  # type: ignore[misc]
    """Tune callback (driver process): nested run per trial, metrics per validation, artifacts at the end."""

    def __init__(self, tracking_uri: str, study: str, parent_run_id: str, extra_params: dict[str, Any]):
        self.tracking_uri = tracking_uri
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
        existing = _find_run(
            mlflow_client, experiment_id, **{TAG_STUDY: self.study, TAG_TRIAL: trial.trial_id}
        )
        if existing is not None:
            run_id = existing.info.run_id
            mlflow_client.update_run(run_id, status="RUNNING")
        else:
            run = mlflow_client.create_run(
                experiment_id,
                run_name=f"trial-{trial.trial_id}",
                tags={
                    TAG_STUDY: self.study,
                    TAG_ROLE: "trial",
                    TAG_TRIAL: trial.trial_id,
                    PARENT_TAG: self.parent_run_id,
                },
            )
            run_id = run.info.run_id
            params = {**self.extra_params, **flat_trial_config(trial.config)}
            for key, value in params.items():
                mlflow_client.log_param(run_id, key, _param_value(value))
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.run_id_for(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        from mlflow.entities import Metric

        run_id = self.run_id_for(trial)
        step = int(result.get("step", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, step)
            for k, v in result.items()
            if isinstance(v, int | float)
            and not isinstance(v, bool)
            and math.isfinite(float(v))
            and (k.startswith(("val_", "train_")) or k in ("it_per_s", "step", "resumed_from_step"))
        ]
        if metrics:
            self._mlflow().log_batch(run_id, metrics=metrics)
        self._last_step[trial.trial_id] = step
        if result.get("perceptual_random"):
            from ldct.losses import RANDOM_PERCEPTUAL_NOTE

            self._mlflow().set_tag(run_id, "ldct.perceptual", RANDOM_PERCEPTUAL_NOTE)
        if result.get("resumed_from_step"):
            # A Ray Train retry restored a checkpoint inside this trial (same run, same trial id).
            self._mlflow().set_tag(run_id, "ldct.resumed_from_step", str(int(result["resumed_from_step"])))
        value = result.get("val_psnr_window")
        if value is not None and value > self._best.get(trial.trial_id, (-math.inf, None))[0]:
            self._best[trial.trial_id] = (float(value), result.get("checkpoint_path"))

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


def log_checkpoint(mlflow_client: Any, run_id: str, checkpoint_path: str) -> None:
    """Copy a (possibly remote) Ray checkpoint into the run: ``checkpoint/`` plus ``panel.png``."""
    from ray.train import Checkpoint

    from ldct.train import CHECKPOINT_FILE, PANEL_FILE, load_state

    with tempfile.TemporaryDirectory(prefix="ldct-artifact-") as tmp:
        local = Path(tmp) / "checkpoint"
        Checkpoint(checkpoint_path).to_directory(str(local))
        mlflow_client.log_artifacts(run_id, str(local), artifact_path="checkpoint")
        if (local / PANEL_FILE).is_file():
            mlflow_client.log_artifact(run_id, str(local / PANEL_FILE))
        state = load_state(local / CHECKPOINT_FILE)
        mlflow_client.log_param(
            run_id, "loss.perceptual_weights_used", _param_value(state.get("perceptual_weights"))
        )
        mlflow_client.log_param(run_id, "best_step", str(state.get("step")))


def trial_runs(mlflow_client: Any, study: str) -> list[Any]:
    experiment = mlflow_client.get_experiment_by_name(f"ldct/{study}")
    if experiment is None:
        return []
    return mlflow_client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{TAG_STUDY}` = '{study}' and tags.`{TAG_ROLE}` = 'trial'",
        max_results=5000,
    )


def study_run(mlflow_client: Any, study: str) -> Any | None:
    experiment = mlflow_client.get_experiment_by_name(f"ldct/{study}")
    if experiment is None:
        return None
    return _find_run(mlflow_client, experiment.experiment_id, **{TAG_STUDY: study, TAG_ROLE: "study"})


def best_trial_run(mlflow_client: Any, study: str) -> Any:
    runs = [
        r
        for r in trial_runs(mlflow_client, study)
        if r.data.tags.get("ldct.status") == "completed" and "best_val_psnr_window" in r.data.metrics
    ]
    if not runs:
        raise TrackingError(f"study {study!r} has no completed trial with a validation metric in MLflow")
    return max(runs, key=lambda r: r.data.metrics["best_val_psnr_window"])


def register_best(study: str, tracking_uri: str | None = None, profile: str = "") -> Any:
    """Register the study's best trial as ``ldct-denoiser`` with alias ``candidate``; returns the version."""
    from ldct.train import CHECKPOINT_FILE, load_state

    mlflow_client = client(tracking_uri)
    best = best_trial_run(mlflow_client, study)
    run_id = best.info.run_id
    with tempfile.TemporaryDirectory(prefix="ldct-register-") as tmp:
        local = Path(mlflow_client.download_artifacts(run_id, f"checkpoint/{CHECKPOINT_FILE}", tmp))
        state = load_state(local)
    tags = {"study": study, "trial_id": best.data.tags.get(TAG_TRIAL, "")}
    if profile:
        tags["profile"] = profile
    return register_state(state, run_id, tracking_uri, tags=tags)


def register_state(
    state: dict[str, Any],
    run_id: str,
    tracking_uri: str | None = None,
    tags: dict[str, str] | None = None,
    alias: str = CANDIDATE,
) -> Any:
    """Log a checkpoint's generator as a model of ``run_id``, register it and point ``alias`` at it."""
    import mlflow
    import mlflow.pytorch
    import torch

    from ldct.train import generator_from_state

    mlflow_client = client(tracking_uri)
    generator, cfg = generator_from_state(state)
    metadata = {
        "normalization": state["normalization"],
        "config": state["config"],
        "metrics": {k: float(v) for k, v in state["metrics"].items() if isinstance(v, int | float)},
        "study": (tags or {}).get("study", ""),
        "trial_run_id": run_id,
        "perceptual_weights": state.get("perceptual_weights", ""),
    }
    with mlflow.start_run(run_id=run_id):
        # "pickle", not the default "pt2": torch.export programs are specialised to the example's
        # shape, and this generator must take any batch and image size (DESIGN.md §5a).
        info = mlflow.pytorch.log_model(
            generator,
            name="model",
            serialization_format="pickle",
            metadata=metadata,
            input_example=torch.zeros(1, 1, 64, 64).numpy(),
            pip_requirements=_requirements(),
        )
    version = mlflow.register_model(info.model_uri, MODEL_NAME)
    all_tags = {
        "trial_run_id": run_id,
        "profile": cfg.profile,
        "encoder": cfg.model.encoder,
        **{k: f"{v:.4f}" for k, v in metadata["metrics"].items() if k.startswith("val_")},
        **(tags or {}),
    }
    for key, value in all_tags.items():
        mlflow_client.set_model_version_tag(MODEL_NAME, version.version, key, str(value))
    mlflow_client.set_registered_model_alias(MODEL_NAME, alias, version.version)
    return mlflow_client.get_model_version(MODEL_NAME, version.version)


def _requirements() -> list[str]:
    # Given explicitly: MLflow's inference of requirements imports and profiles the model (slow).
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "timm", "numpy")] + ["ldct"]


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
    """Load a registered generator (any batch/image size) and its metadata."""
    import mlflow.pytorch
    from mlflow.models import Model

    mlflow_client = client(tracking_uri)
    model_version = resolve_version(mlflow_client, alias, version)
    uri = f"models:/{MODEL_NAME}/{model_version.version}"
    generator = mlflow.pytorch.load_model(uri, map_location="cpu").eval()
    model_meta = Model.load(uri).metadata or {}
    if "normalization" not in model_meta:
        # The HU scaling must travel with the model; guessing it would silently shift every pixel.
        raise TrackingError(
            f"{uri} carries no HU normalisation in its metadata: re-register it from its checkpoint"
        )
    meta = {
        "version": str(model_version.version),
        "run_id": model_version.run_id,
        "aliases": list(model_version.aliases),
        "tags": dict(model_version.tags),
        "normalization": model_meta["normalization"],
        "config": model_meta.get("config", {}),
        "metrics": _metric_rows(model_meta.get("metrics", {})),
        "study": model_meta.get("study", ""),
        "tracking_uri": mlflow_client.tracking_uri,
    }
    return generator, meta


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
                "val_psnr_window": v.tags.get("val_psnr_window", ""),
                "val_ssim_window": v.tags.get("val_ssim_window", ""),
                "fps": v.tags.get("fps", ""),
                "fps_device": v.tags.get("fps_device", ""),
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
