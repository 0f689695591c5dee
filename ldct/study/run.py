"""The study: Ray Tune + Optuna (TPE) over Ray Train runs, ASHA early stopping, MLflow tracking.

``run_study`` checks where the study writes, opens its MLflow parent run, builds (or restores)
the Tuner, fits it, summarises the trials and registers the best one as ``candidate``; each step
is a function below. The Optuna study persists beside the Ray storage, so optuna-dashboard and
Optuna's plots open it, and a resumed Tuner's searcher reconnects to the same study.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldct.cluster import join_storage
from ldct.config import Config, replace, to_flat
from ldct.data.cache import ldct_home
from ldct.errors import TrainingError
from ldct.hyperparams import TUNED_PARAMS
from ldct.registry.versions import register_best
from ldct.study import scaffold
from ldct.study.objectives import objective_metrics, objectives, selection
from ldct.study.pareto import register_candidate
from ldct.study.searcher import PruningOptunaSearch
from ldct.study.space import (
    CHOICE_KEY,
    default_choice,
    extra_points,
    first_point,
    is_paper_point,
    paper_deviations,
    paper_label,
    search_space,
    startup_sentence,
    startup_trials,
    study_config,
    tpe_sampler,
)
from ldct.tracking.runs import best_trial_run, trial_status
from ldct.tracking.store import BEST_METRIC, TAG_TRIAL, TrackingError
from ldct.training import trial_iq
from ldct.training.loop import VAL_METRIC

# A study row's figures: the objective, its LDCT input's value, the window PSNR/SSIM, and (with
# study.iq) the fast image-quality mode's mean LCD AUC and NPS shift.
ROW_METRICS = tuple(
    dict.fromkeys(
        (
            VAL_METRIC,
            f"val_ldct_{VAL_METRIC.removeprefix('val_')}",
            "val_psnr_window",
            "val_ssim_window",
            trial_iq.IQ_METRIC,
            "iq_nps_favg_shift",
            "fps",
        )
    )
)


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
    # Why a registration that was asked for failed (the trials stand; ldct-best can register later).
    registration_error: str | None = None


def optuna_storage_url(cfg: Config, storage_path: Path | str) -> str:
    """Where the study's Optuna study lives: ``study.optuna_storage``, else ``<storage>/<name>.optuna.db``.

    A remote Ray storage (``s3://...``) cannot hold SQLite; the study's Optuna DB then goes to
    ``$LDCT_HOME/optuna/`` on the driver, unless the profile names a shared database.
    """
    if cfg.study.optuna_storage:
        return cfg.study.optuna_storage
    text = str(storage_path).removeprefix("file://")
    if "://" in text:
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
        # Tune found nothing to resume at *this* storage. Trials that finished belong to another
        # study of the same name (another --storage, a shared Optuna database): never delete
        # those. Only a start that died before any trial finished leaves a study to remove;
        # keeping it would mix two studies' trials in one TPE model.
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        old = optuna.load_study(study_name=study, storage=storage)
        done = len(old.get_trials(deepcopy=False, states=finished))
        if done:
            raise TrainingError(
                f"the Optuna study {study!r} in {url} already holds {done} finished trial(s) but no "
                "Tune state was found at this storage: give the study another name (--name NEW or "
                "--set study.name=NEW), resume it from the storage it ran on (--resume --storage ...), or "
                f"delete it: optuna delete-study --study-name {study} --storage {url}"
            )
        print(
            f"[ldct] removing the stale Optuna study {study!r} from {url} (no finished trial, no Tune state)"
        )
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
    if trials is not None:
        cfg = replace(cfg, study={"trials": trials})
    cfg = study_config(cfg)
    started = time.perf_counter()
    study = cfg.study.name
    deviations = paper_deviations(cfg)
    if deviations:
        print(
            f"[ldct] first trial: {paper_label(cfg.profile)}, not the paper's recipe: {', '.join(deviations)}",
            flush=True,
        )
    outputs = scaffold.resolve_outputs(cfg, tracking_uri, storage)
    experiment_dir = _check_resume(study, outputs, resume)
    opened = scaffold.open_study(cfg, study, outputs, resume)
    # The search space's keys are set per trial (the tuned values, RED-CNN's zeros, arch_choice's
    # model.arch and model.encoder), so logged from the trial's config, not the study's. Two
    # objectives are measured after the last step (FPS, image quality; psnr_body is the last
    # validation's): each run keeps that checkpoint, so the rule registers what it measured.
    callback = scaffold.study_callback(
        study,
        outputs,
        opened,
        search_space(cfg).config_keys(),
        checkpoint="last" if len(objectives(cfg)) > 1 else "best",
    )
    optuna_url = optuna_storage_url(cfg, outputs.storage)
    opened.mlflow_client.set_tag(opened.parent_run_id, "ldct.optuna_storage", optuna_url)
    points = 1 + len(cfg.study.extra_points)
    tpe = startup_sentence(startup_trials(cfg), points, cfg.study.trials)
    opened.mlflow_client.set_tag(opened.parent_run_id, "ldct.tpe_startup", tpe)
    print(f"[ldct] {tpe}", flush=True)
    print(f"[ldct] Optuna study {study!r} in {optuna_url} (optuna-dashboard {optuna_url})", flush=True)
    _announce_objectives(cfg, opened)
    tuner = _tuner(cfg, outputs, opened, callback, optuna_url, experiment_dir, resume)
    grid = tuner.fit()

    rows, train_seconds = _trial_rows(cfg, grid)
    wall = time.perf_counter() - started
    _log_summary(opened, rows, wall, train_seconds)
    best, version, pareto_result, registration_error = _register(cfg, outputs, opened, register)
    opened.mlflow_client.set_terminated(opened.parent_run_id, status="FINISHED")
    return StudyResult(
        study,
        outputs.storage,
        outputs.tracking_uri,
        opened.parent_run_id,
        wall,
        train_seconds,
        rows,
        best,
        version,
        pareto_result,
        registration_error,
    )


def _check_resume(study: str, outputs: scaffold.Outputs, resume: bool) -> str:
    """The study's Tune directory; --resume needs one there, a new study must not find one."""
    from ray import tune

    experiment_dir = join_storage(outputs.storage, study)
    can_restore = tune.Tuner.can_restore(experiment_dir)
    if resume and not can_restore:
        raise TrainingError(f"--resume: no study to resume at {experiment_dir} (start it without --resume)")
    if not resume and can_restore:
        raise TrainingError(
            f"a study named {study!r} already exists at {experiment_dir}: pass --resume to "
            f"continue it, or give it another name (--name NEW with studies/loss_weights.py, "
            f"--set study.name=NEW) or another --storage to start a new study"
        )
    return experiment_dir


def _tuner(
    cfg: Config,
    outputs: scaffold.Outputs,
    opened: scaffold.Opened,
    callback: Any,
    optuna_url: str,
    experiment_dir: str,
    resume: bool,
) -> Any:
    """A new Tuner (TPE from the paper's point, ASHA), or the stopped study's Tuner restored."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    study = cfg.study.name
    trainable = scaffold.trainable(cfg, outputs, opened)
    if resume:
        print(f"[ldct] resuming study {study} from {experiment_dir}", flush=True)
        return tune.Tuner.restore(experiment_dir, trainable, resume_unfinished=True, resume_errored=False)
    validations = max(1, math.ceil(cfg.train.iterations / cfg.train.val_every))
    points = [first_point(cfg), *extra_points(cfg)]
    if cfg.study.arch_choices:
        points = [{**p, CHOICE_KEY: default_choice(cfg)} for p in points]
    # Two objectives: both to Optuna (multi-objective TPE), Tune's own metric unset, no ASHA.
    pareto = len(objectives(cfg)) > 1
    # ASHA-stopped trials are told PRUNED (ldct.study.searcher), and TPE starts after a start-up
    # sized to the budget (Optuna's default of 10 exceeds a 6-trial study: TPE never ran).
    searcher = PruningOptunaSearch(
        space=search_space(cfg),
        metric=objective_metrics(cfg) if pareto else VAL_METRIC,
        mode=["max"] * len(objective_metrics(cfg)) if pareto else "max",
        points_to_evaluate=points,
        sampler=tpe_sampler(cfg),
        study_name=study,
        storage=optuna_storage(optuna_url, study, fresh=True),
        iterations=cfg.train.iterations,
    )
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=validations,
        grace_period=min(cfg.study.grace_validations, validations),
        reduction_factor=cfg.study.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=None if pareto else VAL_METRIC,
            mode=None if pareto else "max",
            search_alg=searcher,
            scheduler=None if pareto else scheduler,
            num_samples=cfg.study.trials,
            max_concurrent_trials=cfg.study.max_concurrent,
        ),
        run_config=scaffold.run_config(study, outputs, callback),
    )


def _trial_rows(cfg: Config, grid: Any) -> tuple[list[dict[str, Any]], float]:
    """One row per trial (tuned values, status, last validation) and the summed training seconds."""
    rows = []
    train_seconds = 0.0
    first = first_point(cfg)
    flat = to_flat(cfg)
    for result in grid:
        metrics = result.metrics or {}
        # A value the space does not set (RED-CNN's λ_gp) is the study's, as the trial trained.
        row = {k: (result.config or {}).get(k, flat[k]) for k in TUNED_PARAMS}
        row.update(
            {
                "trial_id": metrics.get("trial_id", ""),
                "label": paper_label(cfg.profile) if is_paper_point(row, first) else "",
                "status": trial_status(bool(result.error), metrics.get("step"), cfg.train.iterations),
                "validations": metrics.get("training_iteration", 0),
                "step": metrics.get("step"),
                **{k: metrics.get(k) for k in ROW_METRICS},
            }
        )
        train_seconds += float(metrics.get("train_seconds", 0.0) or 0.0)
        rows.append(row)
    return rows, train_seconds


def _log_summary(
    opened: scaffold.Opened, rows: list[dict[str, Any]], wall: float, train_seconds: float
) -> None:
    mlflow_client, parent = opened.mlflow_client, opened.parent_run_id
    mlflow_client.log_metric(parent, "study_wall_seconds", wall)
    mlflow_client.log_metric(parent, "study_train_seconds", train_seconds)
    for status in ("completed", "failed", "stopped"):
        mlflow_client.log_metric(parent, f"trials_{status}", sum(r["status"] == status for r in rows))


def _register(
    cfg: Config, outputs: scaffold.Outputs, opened: scaffold.Opened, register: bool
) -> tuple[dict[str, Any] | None, str | None, dict[str, Any] | None, str | None]:
    """The best trial, the version registered from it (or the Pareto choice), the Pareto rows, and
    the reason a registration failed (None when it did not).

    Any error here (a store that cannot be reached, an unreadable or truncated checkpoint, a
    registry refusal) is printed and tagged on the parent run (``ldct.registration_error``), not
    raised: the trials ran and are recorded, and ``ldct-best`` can register one later. A crash at
    the study's very end would hide all of that behind a traceback.
    """
    mlflow_client, parent, study = opened.mlflow_client, opened.parent_run_id, cfg.study.name
    version = best = pareto_result = reason = None
    try:
        best_run = best_trial_run(mlflow_client, study, parent)
        best = {
            "run_id": best_run.info.run_id,
            "trial_id": best_run.data.tags.get(TAG_TRIAL),
            VAL_METRIC: best_run.data.metrics.get(BEST_METRIC, math.nan),
        }
        if math.isfinite(best[VAL_METRIC]):
            mlflow_client.log_metric(parent, BEST_METRIC, best[VAL_METRIC])
        if len(objectives(cfg)) > 1:
            rule = selection(cfg)
            version, pareto_rows, message = (
                register_candidate(study, outputs.tracking_uri, rule, objectives(cfg), profile=cfg.profile)
                if register
                else (None, [], "registration off")
            )
            pareto_result = {
                "rows": pareto_rows,
                "message": message,
                "rule": rule,
                "objectives": objectives(cfg),
            }
        elif register:
            version = str(
                register_best(study, outputs.tracking_uri, profile=cfg.profile, parent_run_id=parent).version
            )
        if version:
            mlflow_client.set_tag(parent, "ldct.registered_version", version)
    except Exception as exc:  # noqa: BLE001 - see the docstring: whatever it is, the trials stand
        reason = str(exc) if isinstance(exc, TrackingError) else f"{type(exc).__name__}: {exc}"
        # Registered, then a tag failed: the version exists and `candidate` points at it.
        said = f"registered version {version} as candidate, then" if version else "nothing registered"
        print(f"[ldct] {said}: {reason}", flush=True)
        try:
            mlflow_client.set_tag(parent, "ldct.registration_error", reason[:5000])
        except Exception:  # noqa: BLE001 - the store itself may be what failed; the line above said it
            pass
    return best, version, pareto_result, reason


def _announce_objectives(cfg: Config, opened: scaffold.Opened) -> None:
    """State the objectives and the registration rule before any trial runs (and tag them), and
    make the fast IQ mode's phantom realizations so that no trial pays for them."""
    rule = selection(cfg).text
    opened.mlflow_client.set_tag(opened.parent_run_id, "ldct.objectives", ",".join(objectives(cfg)))
    opened.mlflow_client.set_tag(opened.parent_run_id, "ldct.selection", rule)
    print(f"[ldct] objectives {', '.join(objectives(cfg))}; registers by '{rule}'", flush=True)
    if cfg.study.iq_enabled():
        seconds = trial_iq.prepare(cfg.data.builtin_dose, cfg.study.iq_realizations)
        print(
            f"[ldct] fast IQ mode: {cfg.study.iq_realizations} realizations of the LCD phantom at dose "
            f"{cfg.data.builtin_dose:g} ready ({seconds:.1f} s)",
            flush=True,
        )
