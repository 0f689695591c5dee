"""Repeats: one configuration (and its arms) trained with N seeds, mean ± std on the test split;
``--protocol loso`` (``ldct.study.loso``) is the confirmatory leave-one-slice-out protocol.

    ldct repeat --study quick --seeds 3 --also paper-matched   # after `ldct study --profile quick`
    ldct repeat --study quick --protocol loso --realizations 4 # the confirmatory protocol (ldct.study.loso)
    python studies/repeat.py --alias candidate                  # the same (a thin caller of this)

The configuration comes from a study's best trial (``--study``) or a registered version
(``--version`` / ``--alias``): its ``model.*``, ``loss.*`` and ``optim.*`` values. The budget and
the data (``data.*``, ``train.*``) come from ``--profile`` (default: the source's own profile), so
every arm of a repeat gets the same iterations. ``train.seed`` varies the network initialisation
and the patch stream together. ``--also`` adds arms (``ldct.study.arms``: the paper's λ's at the
tuned lr, loss-term ablations, RED-CNN) with the *same* seeds, so that each seed gives one paired
difference; ``--retune-lr`` first gives every arm its own lr from a small grid, chosen on the
validation split (:func:`retune_lrs`).

The runs are a Ray Tune grid of Ray Train runs (``max_concurrent`` from the profile), written by
the study's MLflow callback: parent run ``repeat-<source>``, one nested run per (arm, seed) with
``train.seed`` and ``repeat_arm`` as params. After training each run's best-validation
checkpoint is scored on the test split (``test_denoised_*`` metrics on its run); LDCT, Gaussian
and BM3D (tuned on validation) are scored once, on the parent run. The report
``results/<name>/repeat.md`` (+ ``repeat.json``) gives mean ± sample std (ddof=1) over seeds.

Why the paired t-test: the arms share seeds, so the per-seed differences are the data. With
n <= 5 pairs the exact Wilcoxon signed-rank test cannot reach p < 0.05 at all (its smallest
two-sided p is 2/2^n: 0.25 at n = 3, 0.0625 at n = 5), so it cannot say anything at the sizes a
CPU repeat affords; the t-test on the differences can, under the assumption that they are
roughly normal (seed-to-seed spread of a converged metric usually is). Wilcoxon's p is reported
beside it so a reader can see whether the two agree once n grows (the paper used n = 10).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

from ldct.config import Config, from_flat, to_flat
from ldct.errors import LdctError, TrainingError
from ldct.evaluation.baselines import DEFAULT_TUNE_SLICES
from ldct.evaluation.denoisers import torch_denoiser
from ldct.evaluation.tables import budget_lines, evaluate_split
from ldct.registry.load import load_registered
from ldct.study import scaffold
from ldct.study.arms import LR_FACTORS, TUNED_ARM, build_arms, lr_grid, with_lrs
from ldct.tracking.runs import best_trial_run, download_state, log_params, log_test_table, trial_runs
from ldct.tracking.store import PARENT_TAG, client
from ldct.training.checkpoint import generator_from_state
from ldct.training.loop import VAL_METRIC

# The trial-config key (no dot: not a config key) that marks the runs of --retune-lr.
PHASE_KEY = "repeat_phase"
RETUNE_PHASE = "retune"


class RepeatError(LdctError, ValueError):
    """A repeat is asked for without a source, with too few seeds, or from a version without config."""


@dataclasses.dataclass
class RepeatResult:
    name: str
    tracking_uri: str
    parent_run_id: str
    seeds: list[int]
    runs: list[dict[str, Any]]  # per run: run_id, arm, seed, status, test (metric -> value)
    classical: dict[str, dict[str, float]]
    labels: dict[str, str]
    classical_budget: list[str]  # how the classical rows were tuned (ldct.evaluation.tables.budget_lines)
    wall_seconds: float
    retune: dict[str, Any] | None = None  # --retune-lr: grid, validation values, chosen lr per arm


def source_config(
    tracking_uri: str, *, study: str | None = None, version: str | None = None, alias: str | None = None
) -> tuple[str, dict[str, Any]]:
    """(label, flat config) of what to repeat: a study's best trial or a registered version."""
    mlflow_client = client(tracking_uri)
    if study:
        best = best_trial_run(mlflow_client, study)
        return study, dict(download_state(mlflow_client, best.info.run_id)["config"])
    if version is None and alias is None:
        raise RepeatError("give the configuration to repeat: --study NAME, --version V or --alias NAME")
    _, meta = load_registered(alias=alias, version=version, tracking_uri=tracking_uri)
    if not meta.get("config"):
        raise RepeatError(f"registered version {meta['version']} carries no training config to repeat")
    return (alias or f"v{meta['version']}"), dict(meta["config"])


def arm_value(arms: dict[str, dict[str, Any]], key: str, spec: Any) -> Any:
    """A ``tune.sample_from`` body: ``key``'s value in the arm Tune's grid chose for this trial."""
    return arms[spec.config["repeat_arm"]].get(key)


def arm_params(tune: Any, arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every key any arm sets, resolved per trial from its ``repeat_arm`` (Tune resolves the grid first)."""
    return {
        key: tune.sample_from(functools.partial(arm_value, arms, key))
        for key in sorted({k for values in arms.values() for k in values})
    }


def _retune_lr_value(arms: dict[str, dict[str, Any]], spec: Any) -> float:
    return float(arms[spec.config["repeat_arm"]]["optim.lr"]) * float(spec.config["retune_factor"])


def retune_lrs(
    cfg: Config,
    name: str,
    outputs: scaffold.Outputs,
    opened: scaffold.Opened,
    arms: dict[str, dict[str, Any]],
    callback: Any,
    seed: int,
    trainable: Any,
) -> dict[str, Any]:
    """``--retune-lr``: every arm at its lr x :data:`LR_FACTORS` (one seed, the profile's budget,
    the validation split of ``opened``), each arm's lr chosen by its LAST validation
    :data:`VAL_METRIC` (the fixed budget: no step is chosen). Returns the grid, values and choices."""
    from ray import tune

    param_space: dict[str, Any] = {
        **arm_params(tune, arms),
        PHASE_KEY: RETUNE_PHASE,
        "repeat_arm": tune.grid_search(list(arms)),
        "retune_factor": tune.grid_search(list(LR_FACTORS)),
        "train.seed": seed,
        "optim.lr": tune.sample_from(functools.partial(_retune_lr_value, arms)),
    }
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=VAL_METRIC, mode="max", num_samples=1, max_concurrent_trials=cfg.study.max_concurrent
        ),
        run_config=scaffold.run_config(f"{name}-retune", outputs, callback),
    )
    rows = []
    for result in tuner.fit():
        value = (result.metrics or {}).get(VAL_METRIC)
        rows.append(
            {
                "arm": result.config["repeat_arm"],
                "factor": float(result.config["retune_factor"]),
                "lr": float(result.config["optim.lr"]),
                "val": float(value) if value is not None and result.error is None else None,
            }
        )
    chosen = {}
    for arm in arms:
        done = [r for r in rows if r["arm"] == arm and r["val"] is not None]
        if done:
            chosen[arm] = max(done, key=lambda r: r["val"])["lr"]
    return {
        "metric": VAL_METRIC,
        "factors": list(LR_FACTORS),
        "seed": seed,
        "grid": lr_grid(arms),
        "rows": sorted(rows, key=lambda r: (r["arm"], r["lr"])),
        "chosen": chosen,
        "validation_patients": list(opened.splits.get("val", [])),
    }


def run_repeat(
    cfg: Config,
    source_label: str,
    source: dict[str, Any],
    *,
    seeds: int = 5,
    also: list[str] | tuple[str, ...] = (),
    retune_lr: bool = False,
    redcnn_source: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
) -> RepeatResult:
    """Train every (arm, seed) as a Ray Tune grid of Ray Train runs, then score each on test."""
    from ray import tune

    if seeds < 1:
        raise RepeatError(f"--seeds must be >= 1, got {seeds}")
    started = time.perf_counter()
    name = f"repeat-{source_label}"
    base_flat = {**to_flat(cfg), "study.name": name}
    arms = build_arms(cfg, source, also, redcnn_source)
    for values in arms.values():
        from_flat({**base_flat, **values})  # checks every arm's values against this version's config
    base = from_flat({**base_flat, **arms[TUNED_ARM]})
    seed_list = [int(cfg.train.seed) + i for i in range(seeds)]

    outputs = scaffold.resolve_outputs(cfg, tracking_uri, storage)
    opened = open_repeat(base, name, outputs, "repeat", source_label)
    mlflow_client, parent = opened.mlflow_client, opened.parent_run_id
    cache_dir, splits = opened.cache_dir, opened.splits
    log_params(
        mlflow_client,
        parent,
        {"repeat.seeds": seeds, "repeat.arms": ",".join(arms), "repeat.retune_lr": retune_lr},
    )
    # The per-run values (seed, arm, the arm's λ's) come from the trial config instead.
    varied = {k for values in arms.values() for k in values} | {"train.seed"}
    callback = scaffold.study_callback(name, outputs, opened, varied)
    trainable = scaffold.trainable(cfg, outputs, opened)
    retune = None
    if retune_lr:
        retune = retune_lrs(cfg, name, outputs, opened, arms, callback, seed_list[0], trainable)
        arms = with_lrs(arms, retune["chosen"])
    param_space: dict[str, Any] = {
        **arm_params(tune, arms),
        "repeat_arm": tune.grid_search(list(arms)),
        "train.seed": tune.grid_search(seed_list),
    }
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=VAL_METRIC, mode="max", num_samples=1, max_concurrent_trials=cfg.study.max_concurrent
        ),
        run_config=scaffold.run_config(name, outputs, callback),
    )
    try:
        tuner.fit()
    except BaseException:
        mlflow_client.set_terminated(parent, status="FAILED")
        raise

    classical, labels, budget = score_classical(base, cache_dir, splits)
    log_test_table(mlflow_client, parent, classical)
    runs = []
    for run in repeat_runs(mlflow_client, name, parent):
        row = {
            "run_id": run.info.run_id,
            "arm": run.data.params.get("repeat_arm", TUNED_ARM),
            "seed": int(run.data.params["train.seed"]),
            "status": run.data.tags.get("ldct.status", "unknown"),
            "test": None,
        }
        if row["status"] == "completed":
            row["test"] = score_run(mlflow_client, run.info.run_id, cache_dir, splits)
            log_test_table(mlflow_client, run.info.run_id, {"denoised": row["test"]})
        runs.append(row)
    wall = time.perf_counter() - started
    mlflow_client.log_metric(parent, "repeat_wall_seconds", wall)
    mlflow_client.set_terminated(parent, status="FINISHED")
    return RepeatResult(
        name, outputs.tracking_uri, parent, seed_list, runs, classical, labels, budget, wall, retune
    )


def open_repeat(
    base: Config, name: str, outputs: scaffold.Outputs, role: str, source_label: str
) -> scaffold.Opened:
    """A new repeat's data, Ray and MLflow parent run (tagged with its kind and source); a repeat of
    this name already at the storage is refused (a repeat never resumes)."""
    from ray import tune

    if tune.Tuner.can_restore(f"{outputs.storage}/{name}"):
        raise TrainingError(
            f"a repeat named {name!r} already exists at {outputs.storage}/{name}: remove it or pass --storage"
        )
    opened = scaffold.open_study(base, name, outputs, resume=False)
    opened.mlflow_client.set_tag(opened.parent_run_id, "ldct.role_detail", role)
    opened.mlflow_client.set_tag(opened.parent_run_id, "ldct.repeat_source", source_label)
    return opened


def repeat_runs(mlflow_client: Any, name: str, parent: str) -> list[Any]:
    """The repeat's own runs (not --retune-lr's) under this parent, by arm then seed."""
    # Only this parent's runs: an earlier repeat of the same name (its Ray dir removed) stays apart.
    mine = [
        r
        for r in trial_runs(mlflow_client, name)
        if r.data.tags.get(PARENT_TAG) == parent and r.data.params.get(PHASE_KEY) != RETUNE_PHASE
    ]
    return sorted(
        mine, key=lambda r: (r.data.params.get("repeat_arm", ""), int(r.data.params.get("train.seed", 0)))
    )


def score_classical(
    cfg: Config, cache_dir: Path, splits: dict[str, list[str]]
) -> tuple[dict[str, dict[str, float]], dict[str, str], list[str]]:
    """LDCT, Gaussian and BM3D (both tuned on validation) on the test split, once per repeat:
    (mean rows, row labels, the tuning budget in words)."""
    table = evaluate_split(
        cache_dir,
        splits.get("test", []),
        splits.get("val", []),
        tune_slices=cfg.data.max_val_slices or DEFAULT_TUNE_SLICES,
        tune_crop=cfg.data.tune_crop,  # as the study's report tunes them: the same rows in both
        window=cfg.data.window,
    )
    rows = {key: dict(table["mean"][key]) for key in table["rows"]}
    return rows, dict(table["labels"]), budget_lines(table)


def score_run(mlflow_client: Any, run_id: str, cache_dir: Path, splits: dict[str, list[str]]) -> dict:
    """Mean test-split metrics of one run's best-validation checkpoint (the model row only)."""
    generator, cfg = generator_from_state(download_state(mlflow_client, run_id))
    table = evaluate_split(
        cache_dir,
        splits.get("test", []),
        splits.get("val", []),
        denoiser=torch_denoiser(generator, cfg.normalization, "cpu"),
        bm3d=False,
        gaussian_sigmas=(0.0,),  # the Gaussian row is scored once, by score_classical
        window=cfg.data.window,
    )
    return dict(table["mean"]["model"])
