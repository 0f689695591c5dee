"""``ldct report``: a study's leaderboard, plots and best image panel, read back from MLflow."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from ldct.config import Config
from ldct.evaluation.denoisers import torch_denoiser
from ldct.evaluation.tables import evaluate_generator, markdown_eval, mean_rows
from ldct.hyperparams import TUNED
from ldct.losses import RANDOM_PERCEPTUAL_NOTE
from ldct.study.space import first_point_of, is_paper_point, paper_label
from ldct.tracking.runs import best_trial_run, download_state, log_report, study_run, trial_runs
from ldct.tracking.store import BEST_METRIC, TAG_TRIAL, TrackingError, client
from ldct.training.checkpoint import generator_from_state
from ldct.training.loop import VAL_METRIC

# The validation figures of a row, the objective first (its best value; the others are the last
# validation's); the window PSNR stays as a secondary column. A metric a run lacks reads NaN.
METRICS = tuple(
    dict.fromkeys(
        (
            VAL_METRIC,
            "val_ssim_body",
            "val_rmse_body_hu",
            "val_psnr_window",
            "val_ssim_window",
            "val_psnr_full",
        )
    )
)
# A trial's image quality on the fast phantoms (study.iq = "fast"; ldct.training.trial_iq), with
# the LDCT input's figure under iq_ldct_*; the columns appear when any trial has them.
IQ_METRICS = ("iq_lcd_auc", "iq_nps_favg_shift", "iq_sigma_hu")
IQ_TITLES = {
    "iq_lcd_auc": "phantom LCD AUC (NPW, mean of 4 inserts)",
    "iq_nps_favg_shift": "phantom NPS f_avg shift [mm⁻¹]",
    "iq_sigma_hu": "phantom σ [HU]",
}
# Each tuned value's column (and the fixed λ₂ beside them).
TUNED_COLUMNS = {t.key: t.key.split(".", 1)[1] for t in TUNED} | {"loss.lambda_l1": "lambda_l1"}
COLUMNS = [
    "rank",
    "trial_id",
    "label",
    "status",
    "best_step",
    *TUNED_COLUMNS.values(),
    *METRICS,
    *IQ_METRICS,
    "run_id",
]
# How a trial's status reads in the report: ASHA's stops are Optuna's pruned trials.
STATUS_TEXT = {"stopped": "pruned (ASHA)"}


def json_safe(value: Any) -> Any:
    """``value`` with every NaN/inf float as None: summary.json is read by strict JSON parsers
    (JavaScript's, jq), which refuse Python's bare ``NaN`` (a trial without image-quality metrics
    has NaN ones)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _first_point(parent: Any) -> tuple[str, dict[str, float]]:
    """The study's profile and its first point (the paper's values clipped into its ranges),
    from the parent run's params."""
    if parent is None:
        return "?", {}
    return parent.data.params.get("profile", "?"), first_point_of(parent.data.params)


def leaderboard_rows(
    mlflow_client: Any, study: str, parent_run_id: str | None = None
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One row per trial of one study invocation (its parent run; default the latest): best
    validation first, stopped, then failed trials last, and the LDCT input's row. The trial with
    the paper's λ's is labelled "paper λ's under profile P"."""
    profile, first = _first_point(study_run(mlflow_client, study, parent_run_id))
    rows, ldct_row = [], {}
    for run in sorted(trial_runs(mlflow_client, study, parent_run_id), key=lambda r: r.info.start_time):
        p, m = run.data.params, run.data.metrics
        row = {
            "trial_id": run.data.tags.get(TAG_TRIAL, ""),
            "label": paper_label(profile) if is_paper_point(p, first) else "",
            "perceptual_random": run.data.tags.get("ldct.perceptual", "") != ""
            or str(p.get("loss.perceptual_weights_used", "")).startswith("random"),
            "status": run.data.tags.get("ldct.status", "running"),
            "best_step": p.get("best_step", ""),
            **{column: _float(p.get(key)) for key, column in TUNED_COLUMNS.items()},
            **{k: m.get(k, math.nan) for k in (*METRICS, *IQ_METRICS)},
            VAL_METRIC: m.get(BEST_METRIC, math.nan),
            "run_id": run.info.run_id,
            "start_time": run.info.start_time,
        }
        rows.append(row)
        if _ldct(VAL_METRIC) in m and VAL_METRIC not in ldct_row:
            ldct_row.update({k: m.get(_ldct(k), math.nan) for k in METRICS})
        if _ldct_iq(IQ_METRICS[0]) in m and not any(k in ldct_row for k in IQ_METRICS):
            ldct_row.update({k: m.get(_ldct_iq(k), math.nan) for k in IQ_METRICS})
    order = {"completed": 0, "stopped": 1, "running": 2, "failed": 3}
    ranked = sorted(rows, key=lambda r: (order.get(r["status"], 2), -_nan_low(r[VAL_METRIC])))
    for i, row in enumerate(ranked, 1):
        row["rank"] = i
    return ranked, ldct_row


def _nan_low(value: float) -> float:
    return -math.inf if value is None or math.isnan(value) else value


def _ldct(metric: str) -> str:
    """The LDCT input's figure beside a validation metric: val_psnr_body -> val_ldct_psnr_body."""
    return f"val_ldct_{metric.removeprefix('val_')}"


def _ldct_iq(metric: str) -> str:
    """The LDCT input's figure beside a trial's IQ metric: iq_lcd_auc -> iq_ldct_lcd_auc."""
    return "iq_ldct_" + metric.removeprefix("iq_")


def _iq_columns(rows: list[dict[str, Any]]) -> list[str]:
    return [k for k in IQ_METRICS if any(not math.isnan(_float(r.get(k))) for r in rows)]


def _title(metric: str) -> str:
    """A metric's column title: val_psnr_body -> "val PSNR body [dB]"."""
    words = metric.removeprefix("val_").split("_")
    unit = " [dB]" if words[0] == "psnr" else " [HU]" if "hu" in words else ""
    words = [w.upper() if w in ("psnr", "ssim", "rmse") else w for w in words if w != "hu"]
    return f"val {' '.join(words)}{unit}"


def _tuned_cell(key: str, value: float) -> str:
    # NaN: a value the trial's architecture has no use for (RED-CNN's λ_gp in a Pareto study).
    return "–" if math.isnan(value) else f"{value:.2e}" if key == "optim.lr" else f"{value:.3g}"


def _cell(metric: str, value: float) -> str:
    if metric.startswith("iq_"):
        return "–" if math.isnan(_float(value)) else f"{value:+.3f}" if "shift" in metric else f"{value:.3f}"
    return f"{value:.4f}" if "ssim" in metric else f"{value:.2f}" if "psnr" in metric else f"{value:.1f}"


def _markdown(rows: list[dict[str, Any]], ldct_row: dict[str, float], tpe: str = "") -> str:
    tuned = [t for t in TUNED if any(not math.isnan(r[TUNED_COLUMNS[t.key]]) for r in rows)]
    iq = _iq_columns(rows)
    shown = [*METRICS, *iq]
    titles = [t.label for t in tuned] + [
        f"best {_title(k)}" if k == VAL_METRIC else IQ_TITLES.get(k) or _title(k) for k in shown
    ]
    lines = [
        "| rank | trial | status | " + " | ".join(titles) + " |",
        "|" + "|".join(["---"] * (3 + len(titles))) + "|",
    ]
    if ldct_row:
        cells = ["–"] * len(tuned) + [_cell(k, ldct_row.get(k, math.nan)) for k in shown]
        lines.append("| – | LDCT input | – | " + " | ".join(cells) + " |")
    for r in rows:
        trial = f"{r['trial_id']} ({r['label']})" if r.get("label") else r["trial_id"]
        status = STATUS_TEXT.get(r["status"], r["status"])
        cells = [_tuned_cell(t.key, r[TUNED_COLUMNS[t.key]]) for t in tuned] + [_cell(k, r[k]) for k in shown]
        lines.append(f"| {r['rank']} | {trial} | {status} | " + " | ".join(cells) + " |")
    notes = []
    labelled = next((r for r in rows if r.get("label")), None)
    if labelled is not None:
        notes.append(
            f'\n"{labelled["label"]}": the paper\'s {", ".join(t.label for t in tuned)} (λ₂ = 1), '
            "clipped into this profile's ranges, with this profile's encoder, n_critic, batch and "
            "iterations; not evidence about the paper's recipe."
        )
    if any(r["status"] == "stopped" for r in rows):
        notes.append(
            "\npruned (ASHA): stopped by ASHA before the last iteration; its figures are those of a "
            "shorter training (told to Optuna as pruned, not complete)."
        )
    if iq:
        notes.append(
            "\nphantom columns: each trial's last checkpoint on the fast image-quality phantoms "
            "(192² at 1.2 mm, the profile's dose; ldct.training.trial_iq): the non-prewhitening "
            "observer's AUC averaged over the 3/5/7/10 mm low-contrast inserts, the shift of the "
            "NPS mean frequency against full dose (negative: coarser, smoother-looking noise) and "
            "the noise σ in the water disk."
        )
    if tpe:
        notes.append(f"\nSearch: {tpe}.")
    if any(r.get("perceptual_random") for r in rows):
        notes.append(f"\n{RANDOM_PERCEPTUAL_NOTE}.")
    return "\n".join(lines) + "\n" + "".join(n + "\n" for n in notes)


def _plots(rows: list[dict[str, Any]], ldct_row: dict[str, float], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    done = [r for r in rows if r["status"] == "completed" and not math.isnan(r[VAL_METRIC])]
    # Log axes: a value a trial did not search (RED-CNN's λ₃ = 0, λ_gp absent) is left out.
    tuned = [t for t in TUNED if any(r[TUNED_COLUMNS[t.key]] > 0 for r in done)] or [TUNED[-1]]
    y_label = _title(VAL_METRIC)
    written = []
    fig, axes = plt.subplots(
        1, len(tuned), figsize=(3.8 * len(tuned), 3.6), constrained_layout=True, squeeze=False
    )
    for ax, t in zip(axes[0], tuned, strict=True):
        mine = [r for r in done if r[TUNED_COLUMNS[t.key]] > 0]
        ax.scatter([r[TUNED_COLUMNS[t.key]] for r in mine], [r[VAL_METRIC] for r in mine], c="tab:blue")
        if VAL_METRIC in ldct_row:
            ax.axhline(ldct_row[VAL_METRIC], color="gray", ls="--", label="LDCT input")
        ax.set_xscale("log")
        # Minor log ticks get labels on short ranges and overlap; decades are enough.
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(t.label)
        ax.set_ylabel(y_label)
    axes[0][0].legend(fontsize=8)
    written.append(out / "psnr_vs_hyperparameters.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)

    history = sorted(done, key=lambda r: r["start_time"])
    fig, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
    values = [r[VAL_METRIC] for r in history]
    ax.plot(range(1, len(values) + 1), values, "o", label="trial")
    ax.plot(
        range(1, len(values) + 1), np.maximum.accumulate(values) if values else [], "-", label="best so far"
    )
    if VAL_METRIC in ldct_row:
        ax.axhline(ldct_row[VAL_METRIC], color="gray", ls="--", label="LDCT input")
    ax.set_xlabel("trial (in start order)")
    ax.set_ylabel(y_label)
    ax.legend(fontsize=8)
    written.append(out / "optimization_history.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.8), constrained_layout=True)
    both = [r for r in done if all(r[TUNED_COLUMNS[t.key]] > 0 for t in tuned)]
    if both:
        columns = [TUNED_COLUMNS[t.key] for t in tuned]
        logs = np.log10(np.array([[r[c] for c in columns] for r in both], dtype=float))
        span = np.ptp(logs, axis=0)
        scaled = (logs - logs.min(axis=0)) / np.where(span > 0, span, 1.0)
        scores = np.array([r[VAL_METRIC] for r in both])
        cmap = plt.get_cmap("viridis")
        norm = plt.Normalize(scores.min(), scores.max() if scores.max() > scores.min() else scores.min() + 1)
        for line, score in zip(scaled, scores, strict=True):
            ax.plot(range(len(columns)), line, color=cmap(norm(score)), alpha=0.8)
        ax.set_xticks(range(len(columns)), [t.label for t in tuned])
        ax.set_ylabel("log-scaled position in the sampled range")
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=y_label)
    written.append(out / "parallel_coordinates.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)
    return written


def write_report(
    study: str,
    tracking_uri: str | None = None,
    results_root: Path | str = "results",
    cfg: Config | None = None,
    study_result: Any = None,
    test_split: bool = True,
) -> Path:
    """Write ``results/<study>/``: leaderboard.csv/.md, plots, best panel, summary.json."""
    mlflow_client = client(tracking_uri)
    parent_id = getattr(study_result, "parent_run_id", None)
    rows, ldct_row = leaderboard_rows(mlflow_client, study, parent_id)
    if not rows:
        raise TrackingError(f"study {study!r} has no trial runs in {mlflow_client.tracking_uri}")
    out = Path(results_root) / study
    out.mkdir(parents=True, exist_ok=True)
    with (out / "leaderboard.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        if ldct_row:
            writer.writerow(
                {
                    "rank": "",
                    "trial_id": "LDCT input",
                    "status": "",
                    **ldct_row,
                }
            )
        writer.writerows({**r, "status": STATUS_TEXT.get(r["status"], r["status"])} for r in rows)
    parent = study_run(mlflow_client, study, parent_id)
    tpe = parent.data.tags.get("ldct.tpe_startup", "") if parent is not None else ""
    (out / "leaderboard.md").write_text(_markdown(rows, ldct_row, tpe))
    _plots(rows, ldct_row, out)

    summary: dict[str, Any] = {
        "study": study,
        "tracking_uri": mlflow_client.tracking_uri,
        "trials": len(rows),
        "completed": sum(r["status"] == "completed" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "stopped": sum(r["status"] == "stopped" for r in rows),
        "objective": VAL_METRIC,
        "ldct_val": ldct_row,
    }
    if tpe:
        summary["tpe"] = tpe
    if parent is not None:
        summary.update(
            {
                k: parent.data.metrics[k]
                for k in ("study_wall_seconds", "study_train_seconds")
                if k in parent.data.metrics
            }
        )
    best = next((r for r in rows if r["status"] == "completed"), None)
    if best is not None:
        summary["best"] = {k: best[k] for k in COLUMNS if k in best}
        with tempfile.TemporaryDirectory() as tmp:
            try:
                panel = mlflow_client.download_artifacts(best["run_id"], "panel.png", tmp)
                (out / "best_panel.png").write_bytes(Path(panel).read_bytes())
            except Exception as exc:  # noqa: BLE001 - a report without a panel still helps
                summary["panel_error"] = str(exc)
            if test_split and cfg is not None:
                full_table = _best_test_table(mlflow_client, best["run_id"], cfg, Path(tmp))
                summary["best_test"] = mean_rows(full_table)
                summary["best_test_eval"] = full_table
                (out / "best_test.md").write_text(_test_markdown(full_table))
    if parent is not None and parent.data.tags.get("ldct.optuna_storage"):
        summary["param_importances"] = write_importances(study, parent.data.tags["ldct.optuna_storage"], out)
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=2, default=str, allow_nan=False))
    # The same files (and the test table as metrics) on the study's parent run, for the MLflow UI.
    log_report(mlflow_client, study, out, summary.get("best_test"), parent_id)
    return out


def _best_test_table(mlflow_client: Any, run_id: str, cfg: Config, tmp: Path) -> dict[str, Any]:
    """The best trial's checkpoint scored by ``ldct.evaluation`` (per slice, mean ± std, BM3D row),
    with a row for the best trial of each study in ``cfg.study.compare`` found in the store."""
    generator, trial_cfg, budget = _trial_generator(mlflow_client, run_id, tmp)
    extra, compared = [], []
    for other in cfg.study.compare if cfg is not None else ():
        try:
            best = best_trial_run(mlflow_client, other)
        except TrackingError as exc:
            compared.append({"study": other, "missing": str(exc)})
            continue
        net, other_cfg, other_budget = _trial_generator(mlflow_client, best.info.run_id, tmp / other)
        label = f"{other} study best ({other_cfg.model.arch})"
        extra.append((f"study_{other}", label, torch_denoiser(net, other_cfg.normalization)))
        trial = best.data.tags.get(TAG_TRIAL, best.info.run_id)
        compared.append({"study": other, "label": label, "trial": trial, **other_budget})
    # The trial's own model config, the report profile's data (its test split and cache).
    data_cfg = dataclasses.replace(trial_cfg, data=cfg.data) if cfg is not None else trial_cfg
    table = evaluate_generator(generator, data_cfg, label="best trial", extra=extra)
    # The learned side of the budget, written beside the classical one (issue "science" item 4).
    table["learned_budget"] = budget
    table["compared"] = compared
    return table


def _trial_generator(mlflow_client: Any, run_id: str, tmp: Path) -> tuple[Any, Config, dict[str, int]]:
    """A trial's best checkpoint (weights only) as (generator, its config, its learned budget)."""
    tmp.mkdir(parents=True, exist_ok=True)
    state = download_state(mlflow_client, run_id)
    generator, trial_cfg = generator_from_state(state)
    budget = {
        "trials": trial_cfg.study.trials,
        "iterations": trial_cfg.train.iterations,
        "step": int(state.get("step", 0)),
    }
    return generator, trial_cfg, budget


def _test_markdown(table: dict[str, Any]) -> str:
    budget = table.get("learned_budget")
    learned = (
        f"- best trial: the best of {budget['trials']} trials of up to {budget['iterations']} iterations "
        f"each (ASHA prunes poor ones early), checkpoint of step {budget['step']}, selected on "
        f"{VAL_METRIC} (the validation split, never the test slices)\n"
        if budget
        else ""
    )
    for c in table.get("compared", []):
        if "missing" in c:
            learned += f"- {c['study']}: not compared ({c['missing']}; run `ldct study --profile {c['study']}` first)\n"
        else:
            learned += (
                f"- {c['label']}: trial {c['trial']}, the best of {c['trials']} trials of up to "
                f"{c['iterations']} iterations each, checkpoint of step {c['step']}, selected on "
                f"{VAL_METRIC} of its own study\n"
            )
    header = "# Held-out test split: the study's best trial against LDCT, Gaussian and BM3D\n\n"
    return header + markdown_eval(table) + learned


def write_importances(study: str, storage_url: str, out: Path) -> dict[str, Any]:
    """Optuna's parameter importances (fANOVA) of the study: param_importances.md/.png.

    Computed over the complete trials only (Optuna's default): a pruned trial's value is that of
    a shorter training, not a point of the objective. Returns {"importances": {param: share},
    "complete_trials", "pruned_left_out"} or {"error": why} (fewer than two complete trials, say):
    a report without importances still helps.
    """
    import optuna

    try:
        ot_study = optuna.load_study(study_name=study, storage=storage_url)
        states = [t.state for t in ot_study.trials]
        complete = states.count(optuna.trial.TrialState.COMPLETE)
        pruned = states.count(optuna.trial.TrialState.PRUNED)
        if complete < 2:
            # fANOVA over one trial splits the importance evenly: a number that says nothing.
            raise ValueError(f"{complete} complete trial(s) ({pruned} pruned): importances need at least 2")
        # fANOVA named and seeded on purpose: Optuna 5's default evaluator is PED-ANOVA.
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        raw = optuna.importance.get_param_importances(ot_study, evaluator=evaluator)
    except (KeyError, ValueError, RuntimeError) as exc:
        return {"storage": storage_url, "error": str(exc)}
    importances = {name: float(value) for name, value in raw.items()}
    lines = [
        f"# Parameter importances (Optuna fANOVA over {complete} complete trials, objective {VAL_METRIC})",
        "",
        f"{pruned} pruned (ASHA) trial(s) left out: a pruned trial's value is that of a shorter training.",
        "",
        "| parameter | importance |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value:.3f} |" for name, value in importances.items()]
    lines += ["", f"Open the study: `optuna-dashboard {storage_url}`", ""]
    (out / "param_importances.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.8), constrained_layout=True)
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (fANOVA, share of the objective's variance)")
    fig.savefig(out / "param_importances.png", dpi=90)
    plt.close(fig)
    return {
        "storage": storage_url,
        "complete_trials": complete,
        "pruned_left_out": pruned,
        "importances": importances,
    }
