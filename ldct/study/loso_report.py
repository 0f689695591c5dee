"""The report of a LOSO repeat: per-slice values, paired differences over slices, the endpoints.

Averaging order (``slice_values``): one run's metric is averaged over the K realizations of its
test slice, then over the seeds of the arm (a failed seed drops out whole, it does not reweigh the
realizations); the baselines have no seed. The paired difference of two methods is taken per
slice and the interval is over slices (``ldct.study.endpoints.t_interval``): slices are the
sampled unit, realizations and seeds only sharpen each slice's value.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ldct.metrics import METRIC_NAMES
from ldct.study.arms import LABELS, TUNED_ARM
from ldct.study.endpoints import REFERENCES, check_endpoints, met, t_interval
from ldct.study.loso import LosoResult
from ldct.tracking.store import client

REFERENCE_LABELS = {"ldct": "LDCT input", "bm3d": "BM3D (σ_psd estimated from the input)"}
# The metrics the markdown shows (repeat.json has every metric).
SHOWN = tuple(m for m in ("psnr_body", "ssim_body", "rmse_body_hu") if m in METRIC_NAMES) or METRIC_NAMES[:3]


def slice_values(rows: list[dict[str, Any]], method: str, metric: str) -> dict[str, float]:
    """fold -> ``method``'s ``metric``: mean over realizations within a seed, then over seeds."""
    cells: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["method"] == method:
            cells[row["fold"]][row["seed"]].append(float(row["metrics"][metric]))
    return {
        fold: float(np.mean([np.mean(values) for values in by_seed.values()]))
        for fold, by_seed in cells.items()
    }


def paired(rows: list[dict[str, Any]], arm: str, reference: str, metric: str) -> dict[str, Any]:
    """Per-slice ``arm`` - ``reference`` over the slices both have, with its mean and 95 % t-interval."""
    a, b = slice_values(rows, arm, metric), slice_values(rows, reference, metric)
    common = sorted(set(a) & set(b))
    diffs = {fold: a[fold] - b[fold] for fold in common}
    return {
        "arm": arm,
        "reference": reference,
        "metric": metric,
        "per_slice": diffs,
        **t_interval(list(diffs.values())),
    }


def comparisons(
    rows: list[dict[str, Any]], arms: list[str], references: Sequence[str] = REFERENCES
) -> list[dict[str, Any]]:
    """Every arm vs each baseline, and the tuned arm vs every other arm, in every metric."""
    pairs = [(arm, ref) for arm in arms for ref in references]
    pairs += [(TUNED_ARM, arm) for arm in arms if arm != TUNED_ARM]
    return [paired(rows, arm, ref, metric) for arm, ref in pairs for metric in METRIC_NAMES]


def summary_of(result: LosoResult, cfg: Any) -> dict[str, Any]:
    """Everything the report shows, as numbers (``repeat.json``)."""
    arms = list(result.arms)
    methods = [*result.references, *arms]
    endpoints = []
    for i, endpoint in enumerate(check_endpoints(cfg, arms, result.references)):
        row = paired(result.rows, endpoint.arm, endpoint.reference, endpoint.metric)
        missing = [f for f in result.folds if f not in row["per_slice"]]
        # A verdict over fewer slices than the protocol's folds answers another question.
        verdict = met(endpoint, row) if not missing else None
        endpoints.append({"role": "primary" if i == 0 else "secondary", "text": endpoint.text,
                          "op": endpoint.op, "margin": endpoint.margin, "met": verdict,
                          "missing_folds": missing, **row})  # fmt: skip
    slices = {}
    for fold in result.folds:
        slices[fold] = {
            **result.slices[fold],
            "methods": {
                m: {
                    metric: slice_values(result.rows, m, metric).get(fold, math.nan)
                    for metric in METRIC_NAMES
                }
                for m in methods
            },
        }
    means = {m: {metric: t_interval([s["methods"][m][metric] for s in slices.values()
                                     if math.isfinite(s["methods"][m][metric])]) for metric in METRIC_NAMES}
             for m in methods}  # fmt: skip
    return {
        "name": result.name,
        "protocol": "loso",
        "profile": cfg.profile,
        "iterations": cfg.train.iterations,
        "checkpoint": "last",
        "folds": result.folds,
        "seeds": result.seeds,
        "realizations": result.realizations,
        "dose": result.dose,
        "arms": {a: {"label": LABELS.get(a, a), "values": v} for a, v in result.arms.items()},
        "primary_endpoint": endpoints[0],
        "secondary_endpoints": endpoints[1:],
        "slices": slices,
        "means": means,
        "references": result.references,
        "comparisons": comparisons(result.rows, arms, result.references),
        "retune": result.retune,
        "runs": result.runs,
        "rows": result.rows,
        "wall_seconds": result.wall_seconds,
        "parent_run_id": result.parent_run_id,
    }


def _num(metric: str, value: float, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return (
        f"{value:+.4f}"
        if "ssim" in metric and signed
        else f"{value:.4f}"
        if "ssim" in metric
        else (f"{value:+.2f}" if signed else f"{value:.2f}")
    )


def _ci(metric: str, row: dict[str, Any], signed: bool = True) -> str:
    return f"{_num(metric, row['mean'], signed)} [{_num(metric, row['low'], signed)}, {_num(metric, row['high'], signed)}]"


def _endpoint_line(e: dict[str, Any]) -> str:
    verdict = (
        f"**not evaluable** (no value for {', '.join(e['missing_folds'])})"
        if e.get("missing_folds")
        else "**met**"
        if e["met"]
        else "**not met**"
    )
    unit = "" if "ssim" in e["metric"] else (" HU" if "rmse" in e["metric"] else " dB")
    return (
        f"`{e['text']}`: {e['arm']} − {e['reference']} in {e['metric']}, mean over {e['n']} slices "
        f"{_ci(e['metric'], e)}{unit} (95 % t-interval, {max(e['n'] - 1, 0)} df); target mean "
        f"{e['op']} {e['margin']:+g}{unit} with the interval {'above' if e['op'] == '>=' else 'below'} 0: {verdict}"
    )


def markdown(summary: dict[str, Any]) -> str:
    """``repeat.md``: the primary endpoint first, then the protocol, per-slice table and comparisons."""
    s = summary
    names = {**REFERENCE_LABELS, **{a: v["label"] for a, v in s["arms"].items()}}
    methods = [*s["references"], *s["arms"]]
    lines = [
        f"# {s['name']}: leave one real slice out ({len(s['folds'])} folds)",
        "",
        f"Primary endpoint (study.primary_endpoint of profile `{s['profile']}`, fixed before the run): "
        + _endpoint_line(s["primary_endpoint"]),
        "",
        *(f"Secondary: {_endpoint_line(e)}" for e in s["secondary_endpoints"]),
        "",
        f"Protocol: each real slice is the test fold once; its models train on the phantoms and the other "
        f"real slices for {s['iterations']} iterations and the LAST checkpoint is scored (no choice on any "
        f"fold); validation is the phantom patient only. Seeds {s['seeds']}; {s['realizations']} quarter-dose "
        f"realizations per slice (dose {s['dose']:g}, calibrated simulator), the same for every method. Per "
        "slice: mean over realizations, then over seeds; intervals are over slices (Student t, n − 1 df).",
        "",
    ]
    for metric in SHOWN:
        lines += [f"## {metric} per test slice", ""]
        lines.append(
            "| slice | eff. dose | window | looked at before | "
            + " | ".join(names[m] for m in methods)
            + " |"
        )
        lines.append("|---|---|---|---|" + "---|" * len(methods))
        for fold, row in s["slices"].items():
            dose = row.get("effective_dose")
            lines.append(
                f"| {fold} | {dose:.3f} | "
                if isinstance(dose, int | float)
                else f"| {fold} | n/a (uncalibrated) | "
            )
            lines[-1] += (
                f"{row['window']} | {row['looked_at']} | "
                + " | ".join(_num(metric, row["methods"][m][metric]) for m in methods)
                + " |"
            )
        lines.append(
            "| **mean [95 % CI]** | | | | "
            + " | ".join(_ci(metric, s["means"][m][metric], False) for m in methods)
            + " |"
        )
        lines.append("")
    lines += [
        "## Paired differences over slices (mean [95 % CI])",
        "",
        "| comparison | " + " | ".join(SHOWN) + " |",
    ]
    lines.append("|---|" + "---|" * len(SHOWN))
    by = {(c["arm"], c["reference"], c["metric"]): c for c in s["comparisons"]}
    for arm, ref in dict.fromkeys((c["arm"], c["reference"]) for c in s["comparisons"]):
        lines.append(f"| {arm} − {ref} | " + " | ".join(_ci(m, by[arm, ref, m]) for m in SHOWN) + " |")
    lines += ["", "## Arms", ""]
    for arm, value in s["arms"].items():
        loss = {
            k: v
            for k, v in value["values"].items()
            if k.startswith("loss.lambda") or k in ("optim.lr", "model.arch")
        }
        lines.append(
            f"- `{arm}`: {value['label']}; "
            + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(loss.items()))
        )
    if s["retune"]:
        r = s["retune"]
        lines += ["", f"--retune-lr: each arm's lr × {[round(f, 4) for f in r['factors']]}, seed {r['seed']}, "
                  f"chosen by the last {r['metric']} on validation {r['validation_patients']}:", "",
                  "| arm | lr | validation | chosen |", "|---|---|---|---|"]  # fmt: skip
        for row in r["rows"]:
            val = "failed" if row["val"] is None else f"{row['val']:.3f}"
            lines.append(
                f"| {row['arm']} | {row['lr']:.3g} | {val} | {'✓' if r['chosen'].get(row['arm']) == row['lr'] else ''} |"
            )
    failed = [f"{r['arm']}/{r['fold']}/seed {r['seed']}" for r in s["runs"] if r["test"] is None]
    if failed:
        lines += ["", f"Failed runs (left out of their slice's mean): {', '.join(failed)}"]
    lines += ["", f"Wall time {s['wall_seconds'] / 60:.1f} min; MLflow parent run {s['parent_run_id']}."]
    return "\n".join(lines) + "\n"


def write_report(result: LosoResult, cfg: Any, results_root: str | Path) -> Path:
    """``results/<name>/repeat.md`` + ``repeat.json``, logged on the parent run with the endpoints."""
    out = Path(results_root) / result.name
    out.mkdir(parents=True, exist_ok=True)
    summary = summary_of(result, cfg)
    (out / "repeat.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    (out / "repeat.md").write_text(markdown(summary))
    mlflow_client = client(result.tracking_uri)
    for e in (summary["primary_endpoint"], *summary["secondary_endpoints"]):
        prefix = (
            "primary"
            if e["role"] == "primary"
            else f"secondary_{e['arm']}_{e['reference']}".replace("+", "_plus_")
        )
        for key in ("mean", "low", "high"):
            if math.isfinite(e[key]):
                mlflow_client.log_metric(result.parent_run_id, f"{prefix}_{e['metric']}_{key}", e[key])
        if e["met"] is not None:
            mlflow_client.log_metric(result.parent_run_id, f"{prefix}_met", float(e["met"]))
    mlflow_client.log_artifacts(result.parent_run_id, str(out), artifact_path="report")
    return out
