"""Two objectives: the Pareto ranks of a study's trials and the registration by its stated rule.

A study with two ``study.objectives`` (ldct.study.objectives) runs multi-objective TPE without
ASHA: stopping a still-improving trial on one objective would bias the front against the other.
After the study every trial run gets its Pareto rank (1 = on the front) and the study registers
the trial that ``study.selection`` names as ``candidate``, or says that none met it.

The ``pareto`` profile is quality × throughput: ``psnr_body`` and 512² batch-1 FPS, measured by the
trial's rank-0 worker on its own device after its last step (``ldct.deploy.throughput``), with a
categorical ``arch_choice`` over ``study.arch_choices``. The ``clinical`` profile is quality ×
detectability: ``psnr_body`` and the fast mode's mean LCD AUC (``ldct.training.trial_iq``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ldct.registry.versions import MODEL_NAME, register_best
from ldct.study.objectives import METRICS, Selection
from ldct.study.space import CHOICE_KEY
from ldct.tracking.runs import study_run, trial_runs
from ldct.tracking.store import client

SECONDARY = "val_psnr_window"  # shown beside the objectives


def pareto_ranks(points: list[tuple[float, float]]) -> list[int]:
    """Non-dominated sorting, both objectives maximised: rank 1 is the front, 2 the next, ..."""
    ranks = [0] * len(points)
    remaining = set(range(len(points)))
    rank = 1
    while remaining:
        front = {
            i
            for i in remaining
            if not any(
                points[j][0] >= points[i][0]
                and points[j][1] >= points[i][1]
                and (points[j][0] > points[i][0] or points[j][1] > points[i][1])
                for j in remaining
            )
        }
        for i in front:
            ranks[i] = rank
        remaining -= front
        rank += 1
    return ranks


def scored_runs(mlflow_client: Any, study: str, objectives: tuple[str, ...]) -> list[Any]:
    """The study's completed trial runs that logged both objectives."""
    return [
        r
        for r in trial_runs(mlflow_client, study)
        if r.data.tags.get("ldct.status") == "completed"
        and all(METRICS[name] in r.data.metrics for name in objectives)
    ]


def log_ranks(mlflow_client: Any, study: str, objectives: tuple[str, ...]) -> list[dict[str, Any]]:
    """Log ``pareto_rank`` on every scored trial run; returns one row per run (its objectives'
    metrics, the window PSNR, the FPS device where measured, the rank)."""
    runs = scored_runs(mlflow_client, study, objectives)
    keys = [METRICS[name] for name in objectives]
    ranks = pareto_ranks([(r.data.metrics[keys[0]], r.data.metrics[keys[1]]) for r in runs])
    rows = []
    for run, rank in zip(runs, ranks, strict=True):
        mlflow_client.log_metric(run.info.run_id, "pareto_rank", rank)
        rows.append(
            {
                "run_id": run.info.run_id,
                "trial_id": run.data.tags.get("ldct.trial_id", ""),
                "arch_choice": run.data.params.get(CHOICE_KEY, run.data.params.get("model.encoder", "")),
                **{key: run.data.metrics[key] for key in keys},
                SECONDARY: run.data.metrics.get(SECONDARY, math.nan),
                "device": run.data.tags.get("ldct.fps_device", ""),
                "rank": rank,
            }
        )
    return rows


def register_candidate(
    study: str, tracking_uri: str, rule: Selection, objectives: tuple[str, ...], profile: str = ""
) -> tuple[str | None, list[dict[str, Any]], str]:
    """Rank the trials, register the one ``rule`` picks (alias ``candidate``).

    Returns (version or None, rows, a sentence saying what happened); the sentence is also the
    parent run's ``ldct.pareto_decision`` tag, and the rule its ``ldct.selection``.
    """
    mlflow_client = client(tracking_uri)
    rows = log_ranks(mlflow_client, study, objectives)
    chosen, why = rule.choose(rows)
    version = None
    if chosen is None:
        message = f"{why}: nothing registered"
    else:
        run = mlflow_client.get_run(chosen["run_id"])
        version = str(register_best(study, tracking_uri, profile=profile, run=run).version)
        mlflow_client.set_model_version_tag(MODEL_NAME, version, "selection", rule.text)
        for name in objectives:
            mlflow_client.set_model_version_tag(MODEL_NAME, version, name, f"{chosen[METRICS[name]]:.4g}")
        if "fps" in objectives:
            mlflow_client.set_model_version_tag(MODEL_NAME, version, "fps_device", chosen["device"])
        message = (
            f"registered version {version} as candidate by '{rule.text}': trial {chosen['trial_id']} "
            f"({chosen['arch_choice']}), {why}"
        )
    parent = study_run(mlflow_client, study)
    if parent is not None:
        mlflow_client.set_tag(parent.info.run_id, "ldct.pareto_decision", message)
        mlflow_client.set_tag(parent.info.run_id, "ldct.selection", rule.text)
    print(f"[ldct] pareto: {message}", flush=True)
    return version, rows, message


_LABELS = {
    "psnr_body": "val PSNR body [dB]",
    "lcd_auc": "mean LCD AUC (NPW, fast mode)",
    "fps": "FPS at 512×512, batch 1 (trial's device)",
}


def _cell(name: str, value: float) -> str:
    return f"{value:.3f}" if name == "lcd_auc" else f"{value:.3g}" if name == "fps" else f"{value:.2f}"


def write_front(
    rows: list[dict[str, Any]],
    objectives: tuple[str, ...],
    rule: Selection,
    message: str,
    out_dir: Path | str,
) -> Path:
    """``pareto.png`` (every trial, the front as a line, the rule's bar) and ``pareto.md``, which
    also names the trial each objective alone would have chosen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y_name, x_name = objectives
    y_key, x_key = METRICS[y_name], METRICS[x_name]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for choice in sorted({r["arch_choice"] for r in rows}):
        mine = [r for r in rows if r["arch_choice"] == choice]
        ax.scatter([r[x_key] for r in mine], [r[y_key] for r in mine], label=choice, s=36)
    front = sorted((r for r in rows if r["rank"] == 1), key=lambda r: r[x_key])
    if front:
        ax.plot([r[x_key] for r in front], [r[y_key] for r in front], "k--", lw=1, label="Pareto front")
    bar = rule.threshold(rows)
    if rule.floor == x_name and math.isfinite(bar):
        ax.axvline(bar, color="tab:red", lw=1.2, label=f"{rule.floor} >= {bar:.4g}")
    elif rule.floor == y_name and math.isfinite(bar):
        ax.axhline(bar, color="tab:red", lw=1.2, label=f"{rule.floor} >= {bar:.4g}")
    ax.set_xlabel(_LABELS[x_name])
    ax.set_ylabel(_LABELS[y_name])
    ax.set_title(f"{y_name} × {x_name}: {rule.text}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    device = "fps" in objectives
    head = ["trial", "arch", *(_LABELS[n] for n in objectives), f"{SECONDARY} [dB]"]
    head += ["device"] * device + ["Pareto rank"]
    lines = [
        f"# Pareto front: {y_name} × {x_name}",
        "",
        f"Selection rule (stated in the profile before the run): `{rule.text}`.",
        "",
        message,
        "",
    ]
    for name in objectives:
        alone, _ = Selection(name).choose(rows)
        if alone is not None:
            lines.append(
                f"- by {name} alone: trial {alone['trial_id']} ({name} {_cell(name, alone[METRICS[name]])})"
            )
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["rank"], -r[y_key])):
        cells = [r["trial_id"], r["arch_choice"], *(_cell(n, r[METRICS[n]]) for n in objectives)]
        cells += [f"{r.get(SECONDARY, math.nan):.2f}"] + [r["device"]] * device + [str(r["rank"])]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "pareto.md").write_text("\n".join(lines) + "\n")
    return out
