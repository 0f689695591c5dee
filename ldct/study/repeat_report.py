"""Statistics and the report of a seed repeat: mean ± sample std per arm, the paired test.

Why the paired t-test: the arms share seeds, so the per-seed differences are the data. With
n <= 5 pairs the exact Wilcoxon signed-rank test cannot reach p < 0.05 at all (its smallest
two-sided p is 2/2^n), so the t-test on the differences decides and Wilcoxon's p is reported
beside it (``ldct.study.repeat`` explains the whole protocol).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from ldct.metrics import METRIC_NAMES
from ldct.study.arms import PAPER_MATCHED_ARM, TUNED_ARM
from ldct.study.repeat import RepeatResult
from ldct.tracking.store import client


def summarise(values: list[float]) -> dict[str, float]:
    """n, mean and sample std (ddof=1; nan for a single value) of one metric over seeds."""

    a = np.asarray(values, dtype=np.float64)
    return {
        "n": int(a.size),
        "mean": float(a.mean()) if a.size else math.nan,
        "std": float(a.std(ddof=1)) if a.size > 1 else math.nan,
    }


def paired_test(a: list[float], b: list[float]) -> dict[str, float]:
    """a - b per pair: mean, std, paired t-test (the decision) and exact Wilcoxon p (beside it)."""

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
    if TUNED_ARM in arms and PAPER_MATCHED_ARM in arms:
        common = sorted(set(arms[TUNED_ARM]["seeds"]) & set(arms[PAPER_MATCHED_ARM]["seeds"]))
        src, pap = arms[TUNED_ARM]["per_seed"], arms[PAPER_MATCHED_ARM]["per_seed"]
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
        "retune": result.retune,
    }


def _fmt(metric: str, value: float) -> str:
    return "n/a" if not math.isfinite(value) else (f"{value:.4f}" if "ssim" in metric else f"{value:.2f}")


def markdown(summary: dict[str, Any], cfg: Any, arm_labels: dict[str, str]) -> str:
    """``repeat.md``: the budget, mean ± std per arm beside LDCT/BM3D, the paired comparison."""
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
            f"## {arm_labels.get(TUNED_ARM)} − {arm_labels.get(PAPER_MATCHED_ARM)}, paired by seed (n={n})",
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
    retune = summary.get("retune")
    if retune:
        lines += ["", f"--retune-lr (seed {retune['seed']}, last {retune['metric']} on validation "
                  f"{retune['validation_patients']}): " + "; ".join(
                      f"{r['arm']} lr {r['lr']:.3g} → " + ("failed" if r["val"] is None else f"{r['val']:.3f}")
                      for r in retune["rows"]) + f". Chosen: {retune['chosen']}."]  # fmt: skip
    lines += [
        "",
        f"Wall time {summary['wall_seconds'] / 60:.1f} min; MLflow parent run {summary['parent_run_id']}.",
    ]
    return "\n".join(lines) + "\n"


def write_report(
    result: RepeatResult, cfg: Any, results_root: str | Path, arm_labels: dict[str, str]
) -> Path:
    """``results/<name>/repeat.md`` + ``repeat.json``; both are logged on the parent run too."""
    out = Path(results_root) / result.name
    out.mkdir(parents=True, exist_ok=True)
    summary = summary_of(result)
    (out / "repeat.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    (out / "repeat.md").write_text(markdown(summary, cfg, arm_labels))
    client(result.tracking_uri).log_artifacts(result.parent_run_id, str(out), artifact_path="report")
    return out
