"""The quality × throughput (Pareto) study: FPS per trial, ranks, registration against min_fps."""

from __future__ import annotations

import re

import pytest

from ldct.config import ConfigError, load_config
from ldct.registry import versions as registry_versions
from ldct.study.objectives import Selection, parse_selection, selection
from ldct.study.pareto import pareto_ranks, register_candidate, write_front
from ldct.study.report import write_report
from ldct.study.run import run_study
from ldct.study.space import apply_choice
from ldct.tracking import runs as tracking_runs
from ldct.tracking import store as tracking_store
from ldct.training.loop import VAL_METRIC


def test_pareto_ranks_and_selection():
    points = [(30.0, 1.0), (29.0, 5.0), (28.0, 4.0), (30.0, 0.5), (31.0, 0.2)]
    assert pareto_ranks(points) == [1, 1, 2, 2, 1]
    rows = [{VAL_METRIC: q, "fps": f} for q, f in points]
    # best quality among those at >= 0.9 FPS
    assert Selection("psnr_body", "fps", 0.9).choose(rows)[0] is rows[0]
    assert Selection("psnr_body", "fps", 4.5).choose(rows)[0] is rows[1]
    none, why = Selection("psnr_body", "fps", 6.0).choose(rows)
    assert none is None and why == "no trial met fps >= 6 FPS (best 5 FPS)"
    # RED-CNN has no critic and no perceptual term: the trial trains (and logs) both weights at 0.
    assert apply_choice({}, "redcnn") == {
        "model.arch": "redcnn",
        "loss.lambda_adv": 0.0,
        "loss.lambda_perceptual": 0.0,
    }
    assert apply_choice({}, "resnet10t")["model.encoder"] == "resnet10t"


def test_selection_rules_are_parsed_and_applied_with_known_answers():
    rows = [
        {VAL_METRIC: 31.7, "iq_lcd_auc": 0.70},
        {VAL_METRIC: 31.0, "iq_lcd_auc": 0.74},
        {VAL_METRIC: 30.5, "iq_lcd_auc": 0.80},  # the most detectable, but 1.2 dB below the best
        {VAL_METRIC: 29.0, "iq_lcd_auc": float("nan")},  # never scored: never chosen
    ]
    rule = parse_selection("max lcd_auc where psnr_body >= best - 1.0")
    assert rule == Selection("lcd_auc", "psnr_body", 1.0, relative=True)
    assert rule.text == "max lcd_auc where psnr_body >= best - 1"
    chosen, why = rule.choose(rows)
    assert chosen is rows[1] and why == "lcd_auc 0.740, psnr_body 31.00 dB >= 30.70 dB"
    assert parse_selection("max lcd_auc").choose(rows)[0] is rows[2]
    assert parse_selection("max psnr_body where lcd_auc >= 0.72").choose(rows)[0] is rows[1]
    assert rule.choose([rows[3]]) == (None, "no trial reported lcd_auc")
    # The profiles' rules: stated before the run, checked at load.
    assert selection(load_config("clinical")).text == "max lcd_auc where psnr_body >= best - 1"
    assert selection(load_config("pareto")) == Selection("psnr_body", "fps", 1.5)
    assert selection(load_config("quick")).text == "max psnr_body"
    for bad, hint in [
        (["study.selection=max ssim"], "over the study's objectives ['psnr_body']"),
        (["study.selection=min psnr_body"], "expected 'max OBJ'"),
        (["study.objectives=lcd_auc"], "psnr_body is always one of them"),
        (["study.objectives=lcd_auc,fps"], "psnr_body is always one of them"),
        # One objective registers Tune's best trial: a floor would be stated but never applied.
        (["study.selection=max psnr_body where psnr_body >= 40"], "a single-objective study registers"),
        (["study.objectives=psnr_body,lcd_auc,fps"], "one or two different names"),
        (["study.pareto=true", "study.objectives=psnr_body,lcd_auc"], "drop study.pareto"),
        (["study.iq_realizations=5"], "at least 10"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(hint)):
            load_config("quick", bad)


def _aliases(uri: str) -> dict[str, str]:
    model = tracking_store.client(uri).get_registered_model(registry_versions.MODEL_NAME)
    return {alias: str(v) for alias, v in model.aliases.items()}


@pytest.mark.slow
def test_smoke_pareto_study(tmp_path, ray_local):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        "smoke",
        [
            "study.name=par",
            "study.pareto=true",
            "study.arch_choices=resnet10t,redcnn",
            "study.extra_points=optim.lr=3e-4",
            "study.fps_repeats=1",
            "model.redcnn_channels=8",
            "study.min_fps=0",
            # The fast image-quality mode beside the FPS objective (the fewest realizations allowed).
            "study.iq=fast",
            "study.iq_realizations=10",
        ],
    )
    result = run_study(cfg, tracking_uri=uri, storage=str(tmp_path / "runs"))
    mlflow_client = tracking_store.client(uri)
    runs = tracking_runs.trial_runs(mlflow_client, "par")
    assert len(runs) == 2
    for run in runs:
        assert run.data.metrics["fps"] > 0 and run.data.tags["ldct.fps_device"].startswith("cpu")
        assert run.data.metrics["pareto_rank"] >= 1 and "arch_choice" in run.data.params
        # The space set the chosen architecture in the trial's config: MLflow logs it per trial.
        assert (
            run.data.params["model.arch"] == "encoder_decoder"
            and run.data.params["model.encoder"] == "resnet10t"
        )
    assert result.registered_version is not None and result.pareto["rows"]
    # Two objectives are measured after the last step: each run keeps that checkpoint (not the
    # best-PSNR one), so the version the rule registers is the network it measured.
    for run in runs:
        assert run.data.tags["ldct.checkpoint"] == f"last (step {cfg.train.iterations})"
        assert tracking_runs.download_state(mlflow_client, run.info.run_id)["step"] == cfg.train.iterations

    fps = sorted(r.data.metrics["fps"] for r in runs)
    assert fps[0] < fps[1]
    faster = next(r for r in runs if r.data.metrics["fps"] == fps[1])
    # A bar between the two trials: only the faster one meets it, so it is the candidate.
    objectives = ("psnr_body", "fps")
    bar = Selection("psnr_body", "fps", (fps[0] + fps[1]) / 2)
    version, rows, message = register_candidate("par", uri, bar, objectives)
    assert version is not None and "registered version" in message
    tags = mlflow_client.get_model_version(registry_versions.MODEL_NAME, version).tags
    assert tags["trial_run_id"] == faster.info.run_id and float(tags["fps"]) >= (fps[0] + fps[1]) / 2
    assert _aliases(uri)["candidate"] == version
    # A bar no trial meets: nothing registered, and the study says so.
    before = _aliases(uri)
    too_high = Selection("psnr_body", "fps", fps[1] * 10)
    none, _, message = register_candidate("par", uri, too_high, objectives)
    assert (
        none is None and message.startswith("no trial met fps >= ") and message.endswith("nothing registered")
    )
    assert _aliases(uri) == before
    parent = tracking_runs.study_run(mlflow_client, "par")
    assert mlflow_client.get_run(parent.info.run_id).data.tags["ldct.pareto_decision"] == message
    out = write_front(rows, objectives, too_high, message, tmp_path / "report")
    text = (out / "pareto.md").read_text()
    assert (out / "pareto.png").stat().st_size > 0 and message in text
    assert "| val PSNR body [dB] | FPS at 512×512, batch 1 (trial's device) | val_psnr_window [dB] |" in text

    # Every trial carries its fast IQ figures and its LDCT input's, on the same realizations.
    for run in runs:
        m = run.data.metrics
        assert 0.0 <= m["iq_lcd_auc"] <= 1.0 and 0.5 < m["iq_ldct_lcd_auc"] <= 1.0
        assert m["iq_lcd_auc_gain"] == pytest.approx(m["iq_lcd_auc"] - m["iq_ldct_lcd_auc"])
        assert m["iq_sigma_hu"] > 0 and "iq_nps_favg_shift" in m
    assert len({r.data.metrics["iq_ldct_lcd_auc"] for r in runs}) == 1
    # The clinical rule on the same store: the most detectable trial within 100 dB of the best
    # PSNR (every trial qualifies) is the one with the highest AUC, tagged with the rule.
    clinical = ("psnr_body", "lcd_auc")
    rule = parse_selection("max lcd_auc where psnr_body >= best - 100")
    version, rows, message = register_candidate("par", uri, rule, clinical)
    top = max(r.data.metrics["iq_lcd_auc"] for r in runs)
    tags = mlflow_client.get_model_version(registry_versions.MODEL_NAME, version).tags
    chosen = next(r for r in runs if r.info.run_id == tags["trial_run_id"])
    assert chosen.data.metrics["iq_lcd_auc"] == top and tags["selection"] == rule.text
    assert float(tags["lcd_auc"]) == pytest.approx(top, abs=1e-3)
    # The leaderboard shows them, with the LDCT input's row.
    report = write_report("par", uri, tmp_path / "results", test_split=False)
    board = (report / "leaderboard.md").read_text()
    assert "phantom LCD AUC (NPW, mean of 4 inserts)" in board and "phantom NPS f_avg shift" in board
    ldct_line = next(line for line in board.splitlines() if "| LDCT input |" in line)
    assert f"{runs[0].data.metrics['iq_ldct_lcd_auc']:.3f}" in ldct_line
