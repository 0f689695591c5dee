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

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PAPER_ARM = "paper"
SOURCE_ARM = "source"
# Source keys that define "the configuration"; everything else is the profile's budget and data.
CONFIG_SECTIONS = ("model.", "loss.", "optim.")


@dataclasses.dataclass
class RepeatResult:
    name: str
    tracking_uri: str
    parent_run_id: str
    seeds: list[int]
    runs: list[dict[str, Any]]  # per run: run_id, arm, seed, status, test (metric -> value)
    classical: dict[str, dict[str, float]]
    labels: dict[str, str]
    classical_budget: list[str]  # how the classical rows were tuned (ldct.evaluate.budget_lines)
    wall_seconds: float


# ------------------------------------------------------------------------------------ the source


def source_config(
    tracking_uri: str, *, study: str | None = None, version: str | None = None, alias: str | None = None
) -> tuple[str, dict[str, Any]]:
    """(label, flat config) of what to repeat: a study's best trial or a registered version."""
    from ldct import tracking

    mlflow_client = tracking.client(tracking_uri)
    if study:
        from ldct.checkpoint import CHECKPOINT_FILE, load_state

        best = tracking.best_trial_run(mlflow_client, study)
        with tempfile.TemporaryDirectory(prefix="ldct-repeat-") as tmp:
            path = mlflow_client.download_artifacts(best.info.run_id, f"checkpoint/{CHECKPOINT_FILE}", tmp)
            return study, dict(load_state(path)["config"])
    if version is None and alias is None:
        raise ValueError("give the configuration to repeat: --study NAME, --version V or --alias NAME")
    _, meta = tracking.load_registered(alias=alias, version=version, tracking_uri=tracking_uri)
    if not meta.get("config"):
        raise ValueError(f"registered version {meta['version']} carries no training config to repeat")
    return (alias or f"v{meta['version']}"), dict(meta["config"])


def arms_for(base: Any, source: dict[str, Any], also_paper: bool) -> dict[str, dict[str, Any]]:
    """Arm name -> the flat config values it sets on top of the profile ``base``."""
    from ldct.tune import first_point

    chosen = {k: v for k, v in source.items() if k.startswith(CONFIG_SECTIONS)}
    arms = {SOURCE_ARM: chosen}
    if also_paper:
        # The study's first trial: the paper's λ's and lr clipped into this profile's ranges.
        arms[PAPER_ARM] = {**chosen, **first_point(base)}
    return arms


def _arm_value(arms: dict[str, dict[str, Any]], key: str, spec: Any) -> Any:
    # Tune resolves the grid (arm, seed) first, then this sample_from with the arm it chose.
    return arms[spec.config["repeat_arm"]][key]


# ------------------------------------------------------------------------------------ the runs


def run_repeat(
    cfg: Any,
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

    from ldct import tracking
    from ldct.config import from_flat, to_flat
    from ldct.train import VAL_METRIC, TrainingError, init_ray, prepare_data
    from ldct.tune import _storage_path, run_trial

    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    started = time.perf_counter()
    name = f"repeat-{source_label}"
    base_flat = {**to_flat(cfg), "study.name": name}
    arms = arms_for(cfg, source, also_paper)
    base_flat.update(arms[SOURCE_ARM])
    base = from_flat(base_flat)  # checks every source value against this version's config
    seed_list = [int(cfg.train.seed) + i for i in range(seeds)]

    uri = tracking.resolve_tracking_uri(tracking_uri or cfg.study.tracking_uri or None)
    tracking.check_reachable(uri)
    storage_path = _storage_path(storage or cfg.study.storage or None)
    if tune.Tuner.can_restore(f"{storage_path}/{name}"):
        raise TrainingError(
            f"a repeat named {name!r} already exists at {storage_path}/{name}: remove it or pass --storage"
        )
    cache_dir, splits = prepare_data(base)
    init_ray()
    mlflow_client = tracking.client(uri)
    flat = to_flat(base)
    parent = tracking.start_study_run(mlflow_client, name, flat, resume=False)
    mlflow_client.set_tag(parent, "ldct.role_detail", "repeat")
    mlflow_client.set_tag(parent, "ldct.repeat_source", source_label)
    tracking.log_params(mlflow_client, parent, {"repeat.seeds": seeds, "repeat.also_paper": also_paper})
    varied = sorted({k for values in arms.values() for k in values} | {"train.seed"})
    callback = tracking.MLflowStudyCallback(
        uri,
        name,
        parent,
        # The per-run values (seed, arm, the arm's λ's) come from the trial config instead.
        extra_params={
            **{k: v for k, v in flat.items() if k not in varied},
            "data.source": tracking.data_source(flat),
        },
    )
    param_space: dict[str, Any] = {
        "repeat_arm": tune.grid_search(list(arms)),
        "train.seed": tune.grid_search(seed_list),
    }
    for key in sorted({k for values in arms.values() for k in values}):
        param_space[key] = tune.sample_from(functools.partial(_arm_value, arms, key))
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=flat, cache_dir=str(cache_dir), splits=splits, storage=str(storage_path)
        ),
        {"CPU": cfg.study.driver_cpus},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=VAL_METRIC, mode="max", num_samples=1, max_concurrent_trials=cfg.study.max_concurrent
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage_path),
            callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=1,
        ),
    )
    tuner.fit()

    classical, labels, budget = score_classical(base, cache_dir, splits)
    tracking.log_test_table(mlflow_client, parent, classical)
    runs = []
    # Only this parent's runs: an earlier repeat of the same name (its Ray dir removed) stays apart.
    mine = [
        r for r in tracking.trial_runs(mlflow_client, name) if r.data.tags.get(tracking.PARENT_TAG) == parent
    ]
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
            tracking.log_test_table(mlflow_client, run.info.run_id, {"denoised": row["test"]})
        runs.append(row)
    wall = time.perf_counter() - started
    mlflow_client.log_metric(parent, "repeat_wall_seconds", wall)
    mlflow_client.set_terminated(parent, status="FINISHED")
    return RepeatResult(name, uri, parent, seed_list, runs, classical, labels, budget, wall)


def score_classical(
    cfg: Any, cache_dir: Path, splits: dict[str, list[str]]
) -> tuple[dict[str, dict[str, float]], dict[str, str], list[str]]:
    """LDCT, Gaussian and BM3D (both tuned on validation) on the test split, once per repeat:
    (mean rows, row labels, the tuning budget in words)."""
    from ldct.evaluate import DEFAULT_TUNE_SLICES, budget_lines, evaluate_split

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
    from ldct.checkpoint import CHECKPOINT_FILE, generator_from_state, load_state
    from ldct.evaluate import evaluate_split, torch_denoiser

    with tempfile.TemporaryDirectory(prefix="ldct-repeat-") as tmp:
        path = mlflow_client.download_artifacts(run_id, f"checkpoint/{CHECKPOINT_FILE}", tmp)
        generator, cfg = generator_from_state(load_state(path))
    table = evaluate_split(
        cache_dir,
        splits.get("test", []),
        splits.get("val", []),
        denoiser=torch_denoiser(generator, cfg.normalization, "cpu"),
        bm3d=False,
        gaussian_sigmas=(0.0,),  # the Gaussian row is scored once, by score_classical
    )
    return dict(table["mean"]["model"])


# ------------------------------------------------------------------------------------ statistics


def summarise(values: list[float]) -> dict[str, float]:
    """n, mean and sample std (ddof=1; nan for a single value) of one metric over seeds."""
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    return {
        "n": int(a.size),
        "mean": float(a.mean()) if a.size else math.nan,
        "std": float(a.std(ddof=1)) if a.size > 1 else math.nan,
    }


def paired_test(a: list[float], b: list[float]) -> dict[str, float]:
    """a - b per pair: mean, std, paired t-test (the decision) and exact Wilcoxon p (beside it)."""
    import numpy as np
    from scipy import stats

    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    out = {"n": int(diff.size), **{k: v for k, v in summarise(diff.tolist()).items() if k != "n"}}
    out["t_p"] = float(stats.ttest_rel(a, b).pvalue) if diff.size > 1 else math.nan
    if diff.size > 0 and np.any(diff != 0):
        out["wilcoxon_p"] = float(stats.wilcoxon(diff, method="exact").pvalue)
    else:
        out["wilcoxon_p"] = math.nan
    out["wilcoxon_min_p"] = 2.0 / 2**diff.size if diff.size else math.nan
    return out


def summary_of(result: RepeatResult) -> dict[str, Any]:
    """Everything the report shows, as numbers (``repeat.json``)."""
    from ldct.metrics import METRIC_NAMES

    arms: dict[str, Any] = {}
    for arm in sorted({r["arm"] for r in result.runs}):
        done = [r for r in result.runs if r["arm"] == arm and r["test"] is not None]
        arms[arm] = {
            "seeds": [r["seed"] for r in done],
            "failed_seeds": [r["seed"] for r in result.runs if r["arm"] == arm and r["test"] is None],
            "metrics": {m: summarise([r["test"][m] for r in done]) for m in METRIC_NAMES},
            "per_seed": {str(r["seed"]): r["test"] for r in done},
        }
    paired = None
    if SOURCE_ARM in arms and PAPER_ARM in arms:
        common = sorted(set(arms[SOURCE_ARM]["seeds"]) & set(arms[PAPER_ARM]["seeds"]))
        src, pap = arms[SOURCE_ARM]["per_seed"], arms[PAPER_ARM]["per_seed"]
        paired = {
            "seeds": common,
            "metrics": {
                m: paired_test([src[str(s)][m] for s in common], [pap[str(s)][m] for s in common])
                for m in METRIC_NAMES
            },
        }
    return {
        "name": result.name,
        "seeds": result.seeds,
        "arms": arms,
        "classical": result.classical,
        "labels": result.labels,
        "classical_budget": result.classical_budget,
        "paired": paired,
        "wall_seconds": result.wall_seconds,
        "parent_run_id": result.parent_run_id,
    }


# ------------------------------------------------------------------------------------ the report


def _fmt(metric: str, value: float) -> str:
    return "n/a" if not math.isfinite(value) else (f"{value:.4f}" if "ssim" in metric else f"{value:.2f}")


def markdown(summary: dict[str, Any], cfg: Any, arm_labels: dict[str, str]) -> str:
    """``repeat.md``: the budget, mean ± std per arm beside LDCT/BM3D, the paired comparison."""
    from ldct.metrics import METRIC_NAMES

    t = cfg.train
    lines = [
        f"# {summary['name']}: {len(summary['seeds'])} seeds",
        "",
        f"Profile `{cfg.profile}`: {t.iterations} iterations of batch {t.batch_size} "
        f"({cfg.data.patch_size}² patches) per run, seeds {summary['seeds']} (`train.seed`: network "
        "initialisation and patch stream). Every learned arm has the same iteration budget and the "
        "same seeds; the classical rows are tuned on the validation split, never on test:",
        "",
        *(f"- {line}" for line in summary["classical_budget"]),
        "",
        "Test split (real CT), mean ± sample std (ddof=1) over seeds of each run's mean over slices; "
        "`window`: [-160, 240] HU (range 400), `full`: [-1024, 3072] HU (range 4096).",
        "",
        "| method | " + " | ".join(METRIC_NAMES) + " |",
        "|---|" + "---|" * len(METRIC_NAMES),
    ]
    labels = summary["labels"]
    for key in ("ldct", "gaussian", "bm3d"):
        if key in summary["classical"]:
            row = summary["classical"][key]
            lines.append(
                f"| {labels.get(key, key)} | " + " | ".join(_fmt(m, row[m]) for m in METRIC_NAMES) + " |"
            )
    for arm, data in summary["arms"].items():
        cells = [
            f"{_fmt(m, data['metrics'][m]['mean'])} ± {_fmt(m, data['metrics'][m]['std'])}"
            for m in METRIC_NAMES
        ]
        n = data["metrics"][METRIC_NAMES[0]]["n"]
        lines.append(f"| {arm_labels.get(arm, arm)} (n={n}) | " + " | ".join(cells) + " |")
        if data["failed_seeds"]:
            lines.append(f"|  failed seeds: {data['failed_seeds']} |" + " |" * len(METRIC_NAMES))
    lines += ["", "Per seed (test):", "", "| arm | seed | " + " | ".join(METRIC_NAMES) + " |"]
    lines.append("|---|---|" + "---|" * len(METRIC_NAMES))
    for arm, data in summary["arms"].items():
        for seed, row in data["per_seed"].items():
            lines.append(f"| {arm} | {seed} | " + " | ".join(_fmt(m, row[m]) for m in METRIC_NAMES) + " |")
    paired = summary["paired"]
    if paired:
        n = len(paired["seeds"])
        lines += [
            "",
            f"## {arm_labels.get(SOURCE_ARM)} − {arm_labels.get(PAPER_ARM)}, paired by seed (n={n})",
            "",
            "| metric | mean diff | std diff | paired t-test p | Wilcoxon exact p (smallest possible) |",
            "|---|---|---|---|---|",
        ]
        for m, row in paired["metrics"].items():
            lines.append(
                f"| {m} | {row['mean']:+.4f} | {_fmt(m, row['std'])} | {_fmt('p', row['t_p'])} | "
                f"{_fmt('p', row['wilcoxon_p'])} ({row['wilcoxon_min_p']:.3g}) |"
            )
        lines += [
            "",
            "The decision is the paired t-test on the per-seed differences (same seed = same "
            "initialisation and patch stream in both arms). With n ≤ 5 the exact Wilcoxon "
            "signed-rank test cannot go below the p in brackets, so it cannot reject at 0.05; it is "
            "shown to check the t-test's normality assumption once n grows.",
        ]
    lines += [
        "",
        f"Wall time {summary['wall_seconds'] / 60:.1f} min; MLflow parent run {summary['parent_run_id']}.",
    ]
    return "\n".join(lines) + "\n"


def write_report(
    result: RepeatResult, cfg: Any, results_root: str | Path, arm_labels: dict[str, str]
) -> Path:
    """``results/<name>/repeat.md`` + ``repeat.json``; both are logged on the parent run too."""
    from ldct import tracking

    out = Path(results_root) / result.name
    out.mkdir(parents=True, exist_ok=True)
    summary = summary_of(result)
    (out / "repeat.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    (out / "repeat.md").write_text(markdown(summary, cfg, arm_labels))
    tracking.client(result.tracking_uri).log_artifacts(result.parent_run_id, str(out), artifact_path="report")
    return out


# ------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``ldct repeat`` / ``python studies/repeat.py``; returns the exit code."""
    from ldct.study import choose_profile

    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--study", help="repeat this study's best trial configuration")
    src.add_argument(
        "--model-version",
        "--version",
        dest="version",
        help="repeat this registered ldct-denoiser version's configuration",
    )
    src.add_argument("--alias", help="repeat the registered version behind this alias (e.g. candidate)")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5; the paper: 10)")
    parser.add_argument(
        "--also", action="append", default=[], choices=[PAPER_ARM], help="also repeat the paper's λ's and lr"
    )
    parser.add_argument(
        "--profile", help="budget and data (default: the source's own profile, else quick/paper as the study)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument("--storage", help="Ray storage for the runs (default ./runs; shared on a cluster)")
    parser.add_argument("--results", default="results", help="where the report goes (default ./results)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from ldct import tracking
    from ldct.config import ConfigError, list_profiles, load_config
    from ldct.train import TrainingError
    from ldct.tune import paper_label

    try:
        uri = tracking.resolve_tracking_uri(args.tracking_uri)
        tracking.check_reachable(uri)
        label, source = source_config(uri, study=args.study, version=args.version, alias=args.alias)
        profile = args.profile or (
            source.get("profile")
            if source.get("profile") in list_profiles()
            else choose_profile(None, parser.prog)
        )
        cfg = load_config(profile, args.overrides)
        result = run_repeat(
            cfg,
            label,
            source,
            seeds=args.seeds,
            also_paper=PAPER_ARM in args.also,
            tracking_uri=uri,
            storage=args.storage,
        )
    except (ConfigError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except (TrainingError, tracking.TrackingError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    arm_labels = {SOURCE_ARM: f"{label} configuration", PAPER_ARM: paper_label(cfg.profile)}
    out = write_report(result, cfg, args.results, arm_labels)
    print((out / "repeat.md").read_text())
    print(f"report: {out}")
    done = sum(r["test"] is not None for r in result.runs)
    return 0 if done == len(result.runs) else 1
