"""The study: Ray Tune + Optuna (TPE) over Ray Train runs, ASHA early stopping, MLflow tracking.

One Tune trial is a function trainable that builds a TorchTrainer (Train V2) named after the trial
id and calls ``fit()``; ``TuneReportCallback`` forwards the workers' reports to Tune
(DESIGN.md §5a). A trial restarted after an interruption builds a trainer of the same name, and
Train restores it from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldct.config import Config, from_flat, to_flat
from ldct.train import (
    VAL_METRIC,
    TrainingError,
    build_trainer,
    init_ray,
    join_storage,
    prepare_data,
    storage_uri,
)

# The paper's recipe (Hojjat & Shayegan 2025): its tuned values are evaluated first, so every
# study measures them. λ_adv is not tuned but recorded beside them: a profile that scales it
# down (the CPU ones) runs "paper λ's", not the paper's recipe.
PAPER_POINT = {"loss.lambda_l1": 1.0, "loss.lambda_perceptual": 0.1, "loss.lambda_gp": 10.0, "optim.lr": 1e-5}
PAPER_RECORDED = {"loss.lambda_adv": 1.0}
# What else the paper's recipe fixes (flat config key -> the paper's value), for the label.
PAPER_RECIPE = {
    **PAPER_RECORDED,
    "model.encoder": "tf_efficientnetv2_m",
    "train.n_critic": 4,
    "train.batch_size": 128,
    "loss.perceptual_layer": 35,
    "loss.perceptual_weights": "imagenet",
}


@dataclass
class StudyResult:
    study: str
    storage: str  # a URI (s3://, file://) or an absolute path: never a Path, which mangles URIs
    tracking_uri: str
    parent_run_id: str
    wall_seconds: float
    train_seconds: float
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    registered_version: str | None
    # Pareto studies: {"rows": per-trial psnr/fps/rank, "message": the registration decision}.
    pareto: dict[str, Any] | None = None


def study_ranges(cfg: Config) -> dict[str, tuple[float, float]]:
    """The profile's (low, high) range of each tuned hyperparameter, keyed by its flat config name."""
    s = cfg.study
    ranges = {
        "loss.lambda_l1": s.lambda_l1_range,
        "loss.lambda_perceptual": s.lambda_perceptual_range,
        "loss.lambda_gp": s.lambda_gp_range,
        "optim.lr": s.lr_range,
    }
    for key, (low, high) in ranges.items():
        if not 0 < low < high:
            raise ValueError(f"study range for {key} must satisfy 0 < low < high, got ({low}, {high})")
    return ranges


def search_space(cfg: Config) -> dict[str, Any]:
    """Log-uniform ranges for λ₂, λ₃, λ_gp and the learning rate, from the profile."""
    from ray import tune

    space: dict[str, Any] = {
        key: tune.loguniform(low, high) for key, (low, high) in study_ranges(cfg).items()
    }
    if cfg.study.arch_choices:
        from ldct.pareto import CHOICE_KEY

        space[CHOICE_KEY] = tune.choice(list(cfg.study.arch_choices))
    return space


def first_point(cfg: Config) -> dict[str, float]:
    """The paper's values, clipped into the profile's ranges (a range may exclude them on purpose)."""
    ranges = study_ranges(cfg)
    return {k: min(max(v, ranges[k][0]), ranges[k][1]) for k, v in PAPER_POINT.items()}


def extra_points(cfg: Config) -> list[dict[str, float]]:
    """``study.extra_points``: the first point with some tuned values changed ("optim.lr=0.3")."""
    points = []
    for text in cfg.study.extra_points:
        point = dict(first_point(cfg))
        for item in (p.strip() for p in text.split(";") if p.strip()):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in PAPER_POINT or not value:
                raise ValueError(
                    f"study.extra_points entry {text!r}: expected key=value[;key=value] over {sorted(PAPER_POINT)}"
                )
            try:
                point[key] = float(value)
            except ValueError as exc:
                raise ValueError(f"study.extra_points entry {text!r}: {value!r} is not a number") from exc
        points.append(point)
    return points


def paper_deviations(cfg: Config) -> list[str]:
    """Where profile ``cfg`` departs from the paper's recipe beyond the tuned values."""
    flat = to_flat(cfg)
    return [
        f"{key} {flat[key]!r} (paper {value!r})" for key, value in PAPER_RECIPE.items() if flat[key] != value
    ]


def paper_label(profile: str) -> str:
    """The row label of the paper-λ trial: never "the paper", since the profile decides the rest."""
    return f"paper λ's under profile {profile}"


def is_paper_point(params: dict[str, Any], lr: float | None = None) -> bool:
    """Whether a trial's λ's (flat keys) are the paper's; ``lr``: the first point's learning rate
    (the range may clip the paper's), compared too when given."""
    expected = {k: v for k, v in PAPER_POINT.items() if k != "optim.lr"}
    if lr is not None:
        expected["optim.lr"] = lr
    try:
        return all(math.isclose(float(params[k]), v, rel_tol=1e-9) for k, v in expected.items())
    except (KeyError, TypeError, ValueError):
        return False


def run_trial(
    config: dict[str, Any], base: dict[str, Any], cache_dir: str, splits: dict[str, list[str]], storage: str
) -> None:
    """One Tune trial = one Ray Train run with the sampled hyperparameters."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    flat = {**base, **{k: v for k, v in config.items() if "." in k}}
    from ldct.pareto import CHOICE_KEY, apply_choice

    if CHOICE_KEY in config:
        flat = apply_choice(flat, str(config[CHOICE_KEY]))
    cfg = from_flat(flat)
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = build_trainer(
        cfg,
        name=f"{cfg.study.name}-{trial_id}",
        storage_path=join_storage(storage, "train"),
        cache_dir=Path(cache_dir),
        splits=splits,
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def _storage_path(storage: str | None) -> str:
    """The study's storage as a string: a URI as given, a local path absolute (never pathlib on s3://)."""
    return storage_uri(storage or None)


def in_ray_job() -> bool:
    """True in the entrypoint of a `ray job submit` (its working directory is a temporary copy)."""
    import os

    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def check_job_outputs(storage: str, tracking_uri: str) -> None:
    """Under Ray Jobs, refuse storage or an MLflow store inside the temporary working directory:
    everything written there is deleted with it (DESIGN.md §5a)."""
    import os

    if not in_ray_job():
        return
    cwd = str(Path.cwd().resolve())
    for what, where, fix in (
        ("storage", storage, "--storage /shared/path or s3://bucket/prefix (or study.storage)"),
        (
            "MLflow store",
            tracking_uri.removeprefix("sqlite:///"),
            "--tracking-uri / MLFLOW_TRACKING_URI (the head's MLflow server) or study.tracking_uri",
        ),
    ):
        if "://" not in where and os.path.commonpath([cwd, where]) == cwd:
            raise TrainingError(
                f"this Ray Job would write its {what} to {where}, inside the job's temporary "
                f"working directory: give {fix}"
            )


def optuna_storage_url(cfg: Config, storage_path: Path | str) -> str:
    """Where the study's Optuna study lives: ``study.optuna_storage``, else ``<storage>/<name>.optuna.db``.

    A remote Ray storage (``s3://...``) cannot hold SQLite; the study's Optuna DB then goes to
    ``$LDCT_HOME/optuna/`` on the driver, unless the profile names a shared database.
    """
    if cfg.study.optuna_storage:
        return cfg.study.optuna_storage
    text = str(storage_path).removeprefix("file://")
    if "://" in text:
        from ldct.data.cache import ldct_home

        root = ldct_home() / "optuna"
    else:
        root = Path(text)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / f'{cfg.study.name}.optuna.db').resolve()}"


def optuna_storage(url: str, study: str, fresh: bool) -> Any:
    """An Optuna RDB storage; ``fresh``: a leftover study of this name (no Tune state) is removed."""
    import optuna

    storage = optuna.storages.RDBStorage(url)
    if fresh and study in {s.study_name for s in storage.get_all_studies()}:
        # Tune found nothing to resume (checked before), so these trials belong to a start that died
        # before its first save: keeping them would mix two studies' trials in one TPE model.
        print(f"[ldct] removing the stale Optuna study {study!r} from {url} (no Tune state to resume)")
        optuna.delete_study(study_name=study, storage=storage)
    return storage


def run_study(
    cfg: Config,
    *,
    trials: int | None = None,
    tracking_uri: str | None = None,
    resume: bool = False,
    storage: str | None = None,
    register: bool = True,
) -> StudyResult:
    """Run (or resume) the study of ``cfg.study`` and register its best trial as ``candidate``."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from ldct import tracking

    if trials is not None:
        cfg = dataclasses.replace(cfg, study=dataclasses.replace(cfg.study, trials=trials))
    started = time.perf_counter()
    study = cfg.study.name
    deviations = paper_deviations(cfg)
    if deviations:
        print(
            f"[ldct] first trial: {paper_label(cfg.profile)}, not the paper's recipe: {', '.join(deviations)}",
            flush=True,
        )
    uri = tracking.resolve_tracking_uri(tracking_uri or cfg.study.tracking_uri or None)
    tracking.check_reachable(uri)
    storage_path = _storage_path(storage or cfg.study.storage or None)
    check_job_outputs(storage_path, uri)
    experiment_dir = join_storage(storage_path, study)
    can_restore = tune.Tuner.can_restore(experiment_dir)
    if resume and not can_restore:
        raise TrainingError(f"--resume: no study to resume at {experiment_dir} (start it without --resume)")
    if not resume and can_restore:
        raise TrainingError(
            f"a study named {study!r} already exists at {experiment_dir}: pass --resume to "
            f"continue it, or give it another name (--name NEW with studies/loss_weights.py, "
            f"--set study.name=NEW) or another --storage to start a new study"
        )

    cache_dir, splits = prepare_data(cfg)
    init_ray()
    mlflow_client = tracking.client(uri)
    flat = to_flat(cfg)
    parent = tracking.start_study_run(mlflow_client, study, flat, resume)
    data_source = "builtin-simulated" if not cfg.data.root else f"dicom:{cfg.data.root}"
    callback = tracking.MLflowStudyCallback(
        uri,
        study,
        parent,
        extra_params={
            **{
                k: v
                for k, v in flat.items()
                if k not in tracking.TUNED_PARAMS
                # Set per trial by arch_choice (logged as its own param) in a Pareto study.
                and not (cfg.study.arch_choices and k in ("model.arch", "model.encoder", "loss.lambda_adv"))
            },
            "data.source": data_source,
        },
        storage=storage_path,
    )

    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=flat, cache_dir=str(cache_dir), splits=splits, storage=storage_path
        ),
        # The trial function only waits on its trainer; its workers reserve their own CPUs/GPUs.
        {"CPU": cfg.study.driver_cpus},
    )
    # The Optuna study persists beside the Ray storage, so optuna-dashboard and Optuna's plots open
    # it; a resumed Tuner restores the searcher, which reconnects to this same study.
    optuna_url = optuna_storage_url(cfg, storage_path)
    mlflow_client.set_tag(parent, "ldct.optuna_storage", optuna_url)
    print(f"[ldct] Optuna study {study!r} in {optuna_url} (optuna-dashboard {optuna_url})", flush=True)
    if resume:
        print(f"[ldct] resuming study {study} from {experiment_dir}", flush=True)
        tuner = tune.Tuner.restore(experiment_dir, trainable, resume_unfinished=True, resume_errored=False)
    else:
        validations = max(1, math.ceil(cfg.train.iterations / cfg.train.val_every))
        points = [first_point(cfg), *extra_points(cfg)]
        if cfg.study.arch_choices:
            from ldct.pareto import CHOICE_KEY, default_choice

            points = [{**p, CHOICE_KEY: default_choice(cfg)} for p in points]
        # Pareto: both objectives to Optuna (multi-objective TPE), Tune's own metric unset, no ASHA.
        pareto = cfg.study.pareto
        searcher = OptunaSearch(
            metric=[VAL_METRIC, "fps"] if pareto else VAL_METRIC,
            mode=["max", "max"] if pareto else "max",
            points_to_evaluate=points,
            sampler=optuna.samplers.TPESampler(seed=cfg.study.seed),
            study_name=study,
            storage=optuna_storage(optuna_url, study, fresh=True),
        )
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=validations,
            grace_period=min(cfg.study.grace_validations, validations),
            reduction_factor=cfg.study.reduction_factor,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                metric=None if pareto else VAL_METRIC,
                mode=None if pareto else "max",
                search_alg=searcher,
                scheduler=None if pareto else scheduler,
                num_samples=cfg.study.trials,
                max_concurrent_trials=cfg.study.max_concurrent,
            ),
            run_config=tune.RunConfig(
                name=study,
                storage_path=storage_path,
                callbacks=[callback],
                # Retries happen inside Ray Train (from the trial's last checkpoint); a trial that
                # still fails is recorded as failed and the study goes on.
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                verbose=1,
            ),
        )
    grid = tuner.fit()

    rows = []
    train_seconds = 0.0
    first_lr = first_point(cfg)["optim.lr"]
    for result in grid:
        metrics = result.metrics or {}
        row = {k: (result.config or {}).get(k) for k in tracking.TUNED_PARAMS}
        # Recorded beside the tuned values: it decides whether "paper λ's" is the paper's recipe.
        row["loss.lambda_adv"] = cfg.loss.lambda_adv
        step = metrics.get("step")
        if result.error:
            status = "failed"
        elif step is not None and int(step) < cfg.train.iterations:
            status = "stopped"  # by ASHA
        else:
            status = "completed"
        row.update(
            {
                "trial_id": metrics.get("trial_id", ""),
                "label": paper_label(cfg.profile) if is_paper_point(row, first_lr) else "",
                "status": status,
                "validations": metrics.get("training_iteration", 0),
                "step": metrics.get("step"),
                VAL_METRIC: metrics.get(VAL_METRIC),
                "val_ssim_window": metrics.get("val_ssim_window"),
                "val_ldct_psnr_window": metrics.get("val_ldct_psnr_window"),
            }
        )
        train_seconds += float(metrics.get("train_seconds", 0.0) or 0.0)
        rows.append(row)
    wall = time.perf_counter() - started
    mlflow_client.log_metric(parent, "study_wall_seconds", wall)
    mlflow_client.log_metric(parent, "study_train_seconds", train_seconds)
    mlflow_client.log_metric(parent, "trials_completed", sum(r["status"] == "completed" for r in rows))
    mlflow_client.log_metric(parent, "trials_failed", sum(r["status"] == "failed" for r in rows))
    mlflow_client.log_metric(parent, "trials_stopped", sum(r["status"] == "stopped" for r in rows))
    version = None
    best = None
    pareto_result = None
    try:
        best_run = tracking.best_trial_run(mlflow_client, study, parent)
        best = {
            "run_id": best_run.info.run_id,
            "trial_id": best_run.data.tags.get(tracking.TAG_TRIAL),
            VAL_METRIC: best_run.data.metrics["best_val_psnr_window"],
        }
        mlflow_client.log_metric(parent, "best_val_psnr_window", best[VAL_METRIC])
        if cfg.study.pareto:
            from ldct.pareto import register_candidate

            version, pareto_rows, message = (
                register_candidate(study, uri, cfg.study.min_fps, profile=cfg.profile)
                if register
                else (None, [], "registration off")
            )
            pareto_result = {"rows": pareto_rows, "message": message, "min_fps": cfg.study.min_fps}
            if version:
                mlflow_client.set_tag(parent, "ldct.registered_version", version)
        elif register:
            version = str(
                tracking.register_best(study, uri, profile=cfg.profile, parent_run_id=parent).version
            )
            mlflow_client.set_tag(parent, "ldct.registered_version", version)
    except tracking.TrackingError as exc:
        print(f"[ldct] nothing registered: {exc}", flush=True)
    mlflow_client.set_terminated(parent, status="FINISHED")
    return StudyResult(
        study, storage_path, uri, parent, wall, train_seconds, rows, best, version, pareto_result
    )
