"""Quality × throughput: the Pareto study's pieces (``study.pareto = true``, profile ``pareto``).

The study's search space gains a categorical ``arch_choice`` over ``study.arch_choices`` (a timm
encoder name for the default architecture, or ``redcnn``); Optuna (multi-objective TPE) then
maximises the last validation's objective (``VAL_METRIC``) and the generator's 512×512 batch-1 FPS, measured
by the trial's rank-0 worker on its own device after its last training step
(``ldct.deploy.throughput``; batch 1 is the gated latency figure, docs/DESIGN.md §5). ASHA is off:
stopping a fast, still-improving trial on quality alone would bias the front towards slow models.
After the study every trial run gets its Pareto rank (1 = on the front), and the study registers
the best-quality trial whose FPS meets ``study.min_fps`` as ``candidate``, or says that none did.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ldct.registry.versions import MODEL_NAME, register_best
from ldct.study.space import CHOICE_KEY
from ldct.tracking.runs import study_run, trial_runs
from ldct.tracking.store import client
from ldct.training.loop import VAL_METRIC

SECONDARY = "val_psnr_window"  # shown beside the objective


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


def scored_runs(mlflow_client: Any, study: str) -> list[Any]:
    """The study's completed trial runs that logged both objectives."""
    return [
        r
        for r in trial_runs(mlflow_client, study)
        if r.data.tags.get("ldct.status") == "completed"
        and "fps" in r.data.metrics
        and VAL_METRIC in r.data.metrics
    ]


def log_ranks(mlflow_client: Any, study: str) -> list[dict[str, Any]]:
    """Log ``pareto_rank`` on every scored trial run; returns rows (run, psnr, fps, rank, device)."""
    runs = scored_runs(mlflow_client, study)
    ranks = pareto_ranks([(r.data.metrics[VAL_METRIC], r.data.metrics["fps"]) for r in runs])
    rows = []
    for run, rank in zip(runs, ranks, strict=True):
        mlflow_client.log_metric(run.info.run_id, "pareto_rank", rank)
        rows.append(
            {
                "run_id": run.info.run_id,
                "trial_id": run.data.tags.get("ldct.trial_id", ""),
                "arch_choice": run.data.params.get(CHOICE_KEY, run.data.params.get("model.encoder", "")),
                VAL_METRIC: run.data.metrics[VAL_METRIC],
                SECONDARY: run.data.metrics.get(SECONDARY, math.nan),
                "fps": run.data.metrics["fps"],
                "device": run.data.tags.get("ldct.fps_device", ""),
                "rank": rank,
            }
        )
    return rows


def select_candidate(rows: list[dict[str, Any]], min_fps: float) -> dict[str, Any] | None:
    """The best-quality row whose FPS meets ``min_fps``; None when no row does."""
    meeting = [r for r in rows if r["fps"] >= min_fps]
    return max(meeting, key=lambda r: r[VAL_METRIC]) if meeting else None


def register_candidate(
    study: str, tracking_uri: str, min_fps: float, profile: str = ""
) -> tuple[str | None, list[dict[str, Any]], str]:
    """Rank the trials, register the best one meeting ``min_fps`` (alias ``candidate``).

    Returns (version or None, rows, a sentence saying what happened); the sentence is also the
    parent run's ``ldct.pareto_decision`` tag.
    """
    mlflow_client = client(tracking_uri)
    rows = log_ranks(mlflow_client, study)
    chosen = select_candidate(rows, min_fps)
    version = None
    if chosen is None:
        fastest = max((r["fps"] for r in rows), default=math.nan)
        message = (
            f"no trial met min_fps {min_fps:g} (fastest {fastest:.3g} FPS at 512², batch 1): "
            "nothing registered"
        )
    else:
        run = mlflow_client.get_run(chosen["run_id"])
        version = str(register_best(study, tracking_uri, profile=profile, run=run).version)
        mlflow_client.set_model_version_tag(MODEL_NAME, version, "fps", f"{chosen['fps']:.4g}")
        mlflow_client.set_model_version_tag(MODEL_NAME, version, "fps_device", chosen["device"])
        message = (
            f"registered version {version} as candidate: trial {chosen['trial_id']} "
            f"({chosen['arch_choice']}), {VAL_METRIC} {chosen[VAL_METRIC]:.2f} dB at "
            f"{chosen['fps']:.3g} FPS >= {min_fps:g} on {chosen['device']}"
        )
    parent = study_run(mlflow_client, study)
    if parent is not None:
        mlflow_client.set_tag(parent.info.run_id, "ldct.pareto_decision", message)
    print(f"[ldct] pareto: {message}", flush=True)
    return version, rows, message


def write_front(rows: list[dict[str, Any]], min_fps: float, message: str, out_dir: Path | str) -> Path:
    """``pareto.png`` (every trial, the front as a line, the FPS bar) and ``pareto.md``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for choice in sorted({r["arch_choice"] for r in rows}):
        mine = [r for r in rows if r["arch_choice"] == choice]
        ax.scatter([r["fps"] for r in mine], [r[VAL_METRIC] for r in mine], label=choice, s=36)
    front = sorted((r for r in rows if r["rank"] == 1), key=lambda r: r["fps"])
    if front:
        ax.plot(
            [r["fps"] for r in front],
            [r[VAL_METRIC] for r in front],
            "k--",
            lw=1,
            label="Pareto front",
        )
    ax.axvline(min_fps, color="tab:red", lw=1.2, label=f"min_fps {min_fps:g}")
    ax.set_xlabel("FPS at 512×512, batch 1 (trial's device)")
    ax.set_ylabel(f"{VAL_METRIC} [dB]")
    ax.set_title("quality × throughput")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    lines = [
        f"# Pareto front: {VAL_METRIC} × 512² FPS",
        "",
        message,
        "",
        f"| trial | arch | {VAL_METRIC} [dB] | {SECONDARY} [dB] | FPS | device | Pareto rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["rank"], -r[VAL_METRIC])):
        lines.append(
            f"| {r['trial_id']} | {r['arch_choice']} | {r[VAL_METRIC]:.2f} | "
            f"{r.get(SECONDARY, math.nan):.2f} | {r['fps']:.3g} | {r['device']} | {r['rank']} |"
        )
    (out / "pareto.md").write_text("\n".join(lines) + "\n")
    return out
