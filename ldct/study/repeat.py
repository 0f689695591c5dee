"""Seed repeats: one configuration trained with N seeds, mean ± std on the real test panel.

    ldct repeat --study quick --seeds 3 --also paper    # after `ldct study --profile quick`
    python studies/repeat.py --alias candidate           # the same (a thin caller of this)

The configuration comes from a study's best trial (``--study``) or a registered version
(``--version`` / ``--alias``): its ``model.*``, ``loss.*`` and ``optim.*`` values. The budget and
the data (``data.*``, ``train.*``) come from ``--profile`` (default: the source's own profile), so
every arm of a repeat gets the same iterations. ``train.seed`` varies the network initialisation
and the patch stream together. ``--also paper`` adds the paper's λ's and lr (clipped into the
profile's ranges, exactly as the study's first trial) with the *same* seeds, so that each seed
gives one paired difference.

The N (or 2N) runs are a Ray Tune grid of Ray Train runs (``max_concurrent`` from the profile),
written by the study's MLflow callback: parent run ``repeat-<source>``, one nested run per seed
with ``train.seed`` and ``repeat_arm`` as params. After training each run's best-validation
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
from ldct.study.space import first_point
from ldct.tracking.runs import best_trial_run, download_state, log_params, log_test_table, trial_runs
from ldct.tracking.store import PARENT_TAG, client
from ldct.training.checkpoint import generator_from_state
from ldct.training.loop import VAL_METRIC

PAPER_ARM = "paper"
SOURCE_ARM = "source"
# Source keys that define "the configuration"; everything else is the profile's budget and data.
CONFIG_SECTIONS = ("model.", "loss.", "optim.")


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


def arms_for(base: Any, source: dict[str, Any], also_paper: bool) -> dict[str, dict[str, Any]]:
    """Arm name -> the flat config values it sets on top of the profile ``base``."""
    chosen = {k: v for k, v in source.items() if k.startswith(CONFIG_SECTIONS)}
    arms = {SOURCE_ARM: chosen}
    if also_paper:
        # The study's first trial: the paper's λ's and lr clipped into this profile's ranges.
        arms[PAPER_ARM] = {**chosen, **first_point(base)}
    return arms


def _arm_value(arms: dict[str, dict[str, Any]], key: str, spec: Any) -> Any:
    # Tune resolves the grid (arm, seed) first, then this sample_from with the arm it chose.
    return arms[spec.config["repeat_arm"]][key]


def run_repeat(
    cfg: Config,
    source_label: str,
    source: dict[str, Any],
    *,
    seeds: int = 5,
    also_paper: bool = False,
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
    arms = arms_for(cfg, source, also_paper)
    base_flat.update(arms[SOURCE_ARM])
    base = from_flat(base_flat)  # checks every source value against this version's config
    seed_list = [int(cfg.train.seed) + i for i in range(seeds)]

    outputs = scaffold.resolve_outputs(cfg, tracking_uri, storage)
    if tune.Tuner.can_restore(f"{outputs.storage}/{name}"):
        raise TrainingError(
            f"a repeat named {name!r} already exists at {outputs.storage}/{name}: remove it or pass --storage"
        )
    opened = scaffold.open_study(base, name, outputs, resume=False)
    mlflow_client, parent = opened.mlflow_client, opened.parent_run_id
    cache_dir, splits = opened.cache_dir, opened.splits
    mlflow_client.set_tag(parent, "ldct.role_detail", "repeat")
    mlflow_client.set_tag(parent, "ldct.repeat_source", source_label)
    log_params(mlflow_client, parent, {"repeat.seeds": seeds, "repeat.also_paper": also_paper})
    # The per-run values (seed, arm, the arm's λ's) come from the trial config instead.
    varied = {k for values in arms.values() for k in values} | {"train.seed"}
    callback = scaffold.study_callback(name, outputs, opened, varied)
    param_space: dict[str, Any] = {
        "repeat_arm": tune.grid_search(list(arms)),
        "train.seed": tune.grid_search(seed_list),
    }
    for key in sorted({k for values in arms.values() for k in values}):
        param_space[key] = tune.sample_from(functools.partial(_arm_value, arms, key))
    tuner = tune.Tuner(
        scaffold.trainable(cfg, outputs, opened),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=VAL_METRIC, mode="max", num_samples=1, max_concurrent_trials=cfg.study.max_concurrent
        ),
        run_config=scaffold.run_config(name, outputs, callback),
    )
    tuner.fit()

    classical, labels, budget = score_classical(base, cache_dir, splits)
    log_test_table(mlflow_client, parent, classical)
    runs = []
    # Only this parent's runs: an earlier repeat of the same name (its Ray dir removed) stays apart.
    mine = [r for r in trial_runs(mlflow_client, name) if r.data.tags.get(PARENT_TAG) == parent]
    for run in sorted(
        mine,
        key=lambda r: (r.data.params.get("repeat_arm", ""), int(r.data.params.get("train.seed", 0))),
    ):
        row = {
            "run_id": run.info.run_id,
            "arm": run.data.params.get("repeat_arm", SOURCE_ARM),
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
    return RepeatResult(name, outputs.tracking_uri, parent, seed_list, runs, classical, labels, budget, wall)


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
    )
    return dict(table["mean"]["model"])
