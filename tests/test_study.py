"""The study end to end on real Ray and real MLflow (SQLite store and a real server on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from _ray_fixtures import _free_port

from ldct import hyperparams
from ldct.config import load_config, to_flat
from ldct.errors import TrainingError
from ldct.hyperparams import PAPER_POINT
from ldct.registry import load as registry_load
from ldct.registry import versions as registry_versions
from ldct.study import scaffold
from ldct.study.report import write_report
from ldct.study.run import run_study
from ldct.tracking import runs as tracking_runs
from ldct.tracking import store as tracking_store
from ldct.training.loop import VAL_METRIC

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _trials(mlflow_client, study):
    return sorted(tracking_runs.trial_runs(mlflow_client, study), key=lambda r: r.info.start_time)


def _check_registered_model_denoises(uri: str) -> None:
    generator, meta = registry_load.load_registered(alias="candidate", tracking_uri=uri)
    assert meta["normalization"] == {"hu_min": -1024.0, "hu_max": 3072.0}
    # Logged with a 1x1x64x64 example; must take other batch sizes and image sizes.
    for shape in ((2, 1, 80, 96), (1, 1, 128, 128)):
        image = torch.rand(shape) * 0.1 + 0.2
        with torch.no_grad():
            out = generator(image)
        assert out.shape == shape and torch.isfinite(out).all()


def _check_dashboard_reads(storage: str, study: str, trials: int) -> None:
    """The real optuna-dashboard server on 127.0.0.1 lists the study with its trials."""
    import urllib.request

    port = _free_port()
    dashboard = Path(sys.executable).parent / "optuna-dashboard"
    server = subprocess.Popen(
        [dashboard, storage, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as answer:
                    listed = json.load(answer)["study_summaries"]
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "optuna-dashboard did not start"
                time.sleep(0.5)
        assert [s["study_name"] for s in listed] == [study]
        url = f"http://127.0.0.1:{port}/api/studies/{listed[0]['study_id']}"
        with urllib.request.urlopen(url, timeout=30) as answer:
            detail = json.load(answer)
        assert detail["name"] == study and len(detail["trials"]) == trials
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_smoke_study_sqlite(tmp_path, ray_local):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_study(
        load_config("smoke", ["study.name=s1"]), tracking_uri=uri, storage=str(tmp_path / "runs")
    )
    statuses = [t["status"] for t in result.trials]
    # ASHA may stop the second trial after its first validation (grace period 1).
    assert statuses[0] == "completed" and statuses[1] in ("completed", "stopped")
    assert [t["label"] for t in result.trials] == ["paper λ's under profile smoke", ""]
    mlflow_client = tracking_store.client(uri)
    parent = tracking_runs.study_run(mlflow_client, "s1")
    assert parent is not None
    assert parent.data.metrics["trials_completed"] + parent.data.metrics["trials_stopped"] == 2
    runs = _trials(mlflow_client, "s1")
    assert len(runs) == 2
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert set(hyperparams.TUNED_PARAMS) <= set(run.data.params)
        assert run.data.params["data.source"] == "builtin-simulated"
        assert run.data.params["loss.perceptual_weights_used"].startswith("random")
        history = mlflow_client.get_metric_history(run.info.run_id, VAL_METRIC)
        # Every validation is logged; a trial ASHA stopped after its first one is marked so.
        steps = [m.step for m in history]
        assert steps in ([2], [2, 4])
        assert run.data.tags["ldct.status"] == ("stopped" if steps == [2] else "completed")
        assert run.data.tags["ldct.perceptual"] == "perceptual: random weights; λ₃ is not the paper's"
        assert np.isfinite([m.value for m in history]).all()
        artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
        assert {"checkpoint", "panel.png"} <= artifacts
    # The paper's values are the first trial.
    assert [m.step for m in mlflow_client.get_metric_history(runs[0].info.run_id, VAL_METRIC)] == [2, 4]
    first = runs[0].data.params
    for key, value in PAPER_POINT.items():
        assert float(first[key]) == pytest.approx(value)
    version = mlflow_client.get_model_version_by_alias(registry_versions.MODEL_NAME, "candidate")
    assert str(version.version) == result.registered_version
    assert version.tags["study"] == "s1" and version.tags["profile"] == "smoke"
    # The smoke profile registers without the ONNX artifact (study.register_onnx = false).
    stored = next((tmp_path / "mlartifacts").rglob("MLmodel")).parent
    assert (stored / "artifacts" / "weights.safetensors").is_file()
    assert not (stored / "artifacts" / "model.onnx").exists() and "model.onnx" not in version.description
    _check_registered_model_denoises(uri)
    # Each trial's function asked for a share of the head node's marker resource (Train V2 runs
    # the trial's controller there, so a dying worker node cannot take the trial with it); the
    # trials ran, so this Ray knows the name, and only its head carries it.
    assert scaffold.trial_resources(load_config("smoke"))[scaffold.HEAD_NODE_RESOURCE] == 0.001
    heads = [n for n in ray.nodes() if n["Alive"] and scaffold.HEAD_NODE_RESOURCE in n["Resources"]]
    assert len(heads) == 1
    # A head that cannot host the trials' functions is refused up front, not left pending.
    cpus = heads[0]["Resources"]["CPU"]
    with pytest.raises(TrainingError, match=rf"the Ray head has {cpus:g} CPUs .*not --num-cpus=0"):
        scaffold.check_head_hosts_trials(load_config("smoke", [f"study.driver_cpus={cpus + 1}"]))

    # study.compare: the best trial of another study in the store gets its own row on the same test
    # slices (here the study itself: the row must equal the best trial's), a missing one a note.
    cfg = load_config("smoke", ["study.compare=s1,absent"])
    out = write_report("s1", tracking_uri=uri, results_root=tmp_path / "results", cfg=cfg)
    lines = (out / "leaderboard.md").read_text().splitlines()
    assert "LDCT input" in lines[2]  # header, rule, LDCT row, then the 2 trials
    trial_lines = lines[3:5]
    assert all(ln.startswith("| ") for ln in trial_lines) and not lines[5]
    first_id = runs[0].data.tags[tracking_store.TAG_TRIAL]
    paper_row = next(ln for ln in trial_lines if first_id in ln)
    assert f"{first_id} (paper λ's under profile smoke)" in paper_row
    # Quick results are not presented as the paper's: the label is explained, random VGG named.
    notes = "\n".join(lines[5:])
    assert "not evidence about the paper's recipe" in notes
    # Two trials, TPE's start-up of max(2, 2 // 3) = 2: the report says TPE never ran.
    assert "Search: TPE never ran: 2 start-up trials ≥ the study's 2 trials." in notes
    assert parent.data.tags["ldct.tpe_startup"].startswith("TPE never ran")
    assert "perceptual: random weights; λ₃ is not the paper's" in notes
    assert {
        "psnr_vs_hyperparameters.png",
        "optimization_history.png",
        "parallel_coordinates.png",
        "best_panel.png",
        "leaderboard.csv",
        "best_test.md",
    } <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] + summary.get("stopped", 0) == 2
    assert {"ldct", "classical", "bm3d", "denoised", "study_s1"} <= set(summary["best_test"])
    assert summary["best_test"]["study_s1"] == summary["best_test"]["denoised"]
    best_test = (out / "best_test.md").read_text()
    assert "| BM3D" in best_test and "| s1 study best (encoder_decoder) |" in best_test
    assert "absent: not compared (study 'absent' has no completed trial" in best_test

    # The Optuna study persists beside the Ray storage, named after the study, and Optuna opens it.
    import optuna

    storage = f"sqlite:///{tmp_path / 'runs' / 's1.optuna.db'}"
    assert parent.data.tags["ldct.optuna_storage"] == storage
    ot_study = optuna.load_study(study_name="s1", storage=storage)
    # An ASHA-stopped trial is PRUNED in Optuna (not COMPLETE with its cut-short value), and every
    # validation of every trial is an intermediate value (step = Tune's training_iteration).
    state = {"completed": optuna.trial.TrialState.COMPLETE, "stopped": optuna.trial.TrialState.PRUNED}
    assert [t.state for t in ot_study.trials] == [state[r.data.tags["ldct.status"]] for r in runs]
    assert ot_study.trials[0].params == pytest.approx(PAPER_POINT)
    for trial, run in zip(ot_study.trials, runs, strict=True):
        history = mlflow_client.get_metric_history(run.info.run_id, VAL_METRIC)
        assert trial.intermediate_values == pytest.approx({i: m.value for i, m in enumerate(history, 1)})
        assert trial.value == pytest.approx(run.data.metrics[VAL_METRIC])
    _check_dashboard_reads(storage, "s1", trials=2)
    if all(r.data.tags["ldct.status"] == "completed" for r in runs):
        importances = summary["param_importances"]["importances"]
        assert set(importances) == set(PAPER_POINT) and sum(importances.values()) == pytest.approx(1.0)
        assert (out / "param_importances.png").is_file() and (out / "param_importances.md").is_file()
    else:  # fANOVA reads complete trials only: one is too few
        assert "1 complete trial(s) (1 pruned)" in summary["param_importances"]["error"]


def test_an_unreadable_checkpoint_is_nothing_registered_not_a_crash(tmp_path, capsys):
    from ldct.study.run import _register

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_client = tracking_store.client(uri)
    experiment_id = tracking_store.ensure_experiment(mlflow_client, "ldct/broken")
    study_tags = {tracking_store.TAG_STUDY: "broken"}
    parent = mlflow_client.create_run(experiment_id, tags={**study_tags, tracking_store.TAG_ROLE: "study"})
    parent_id = parent.info.run_id
    trial = mlflow_client.create_run(
        experiment_id,
        tags={
            **study_tags,
            tracking_store.TAG_ROLE: "trial",
            tracking_store.PARENT_TAG: parent_id,
            tracking_store.TAG_TRIAL: "t1",
            "ldct.status": "completed",
        },
    )
    mlflow_client.log_metric(trial.info.run_id, tracking_store.BEST_METRIC, 30.0)
    # A checkpoint cut short in transit: the best trial is found, its state cannot be read.
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.pt").write_bytes(b"PK\x03\x04 truncated")
    mlflow_client.log_artifacts(trial.info.run_id, str(tmp_path / "checkpoint"), "checkpoint")
    cfg = load_config("smoke", ["study.name=broken"])
    outputs = scaffold.Outputs(tracking_uri=uri, storage=str(tmp_path / "runs"))
    opened = scaffold.Opened(tmp_path, {}, mlflow_client, to_flat(cfg), parent_id)
    best, version, pareto, reason = _register(cfg, outputs, opened, register=True)
    assert best["trial_id"] == "t1" and best[VAL_METRIC] == 30.0
    assert version is None and pareto is None and reason.startswith("CheckpointError: ")
    out = capsys.readouterr().out
    assert "[ldct] nothing registered: " in out
    error = mlflow_client.get_run(parent_id).data.tags["ldct.registration_error"]
    assert error.startswith("CheckpointError: refused to load ") and "state.pt" in error and error in out
    assert mlflow_client.search_registered_models() == []


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(tracking_store.TrackingError, match="unreachable.*mlflow server"):
        tracking_store.check_reachable("http://127.0.0.1:9", timeout=1)


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    """A RAY_TMPDIR of the test's own, short (Ray's socket paths), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_stopped_study_resumes_without_repeating_a_trial(tmp_path, ray_tmpdir):
    """Runs beside the session's Ray (conftest.OWN_RAY_TESTS): its study has a Ray of its own."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        sys.executable,
        str(ROOT / "studies" / "loss_weights.py"),
        "--profile",
        "smoke",
        "--set",
        "study.name=s3",
        "--tracking-uri",
        uri,
        "--storage",
        str(tmp_path / "runs"),
        "--no-report",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmpdir)}
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "first.log").open("w")
    process = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    mlflow_client = tracking_store.client(uri)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        runs = _trials(mlflow_client, "s3") if mlflow_client.get_experiment_by_name("ldct/s3") else []
        if any(r.data.tags.get("ldct.status") == "completed" for r in runs):
            break
        time.sleep(1)
    assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(process.pid, signal.SIGINT)  # Ctrl+C: Tune saves the experiment state and stops
    process.wait(timeout=120)
    first_runs = _trials(mlflow_client, "s3")
    finished = [r for r in first_runs if r.data.tags.get("ldct.status") == "completed"]
    assert len(finished) == 1
    finished_history = mlflow_client.get_metric_history(finished[0].info.run_id, VAL_METRIC)

    resumed = subprocess.run(
        cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    runs = _trials(mlflow_client, "s3")
    assert len(runs) == 2, [r.data.tags for r in runs]
    # ASHA may stop the second trial after its first validation; none failed.
    assert all(r.data.tags.get("ldct.status") in ("completed", "stopped") for r in runs)
    # The finished trial was not run again: same run, same metric history.
    again = mlflow_client.get_metric_history(finished[0].info.run_id, VAL_METRIC)
    assert [(m.step, m.value) for m in again] == [(m.step, m.value) for m in finished_history]
    assert "registered ldct-denoiser version" in resumed.stdout
    # The resumed Tuner continued the same persistent Optuna study: both trials, one study.
    import optuna

    storage = f"sqlite:///{tmp_path / 'runs' / 's3.optuna.db'}"
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["s3"]
    trials = optuna.load_study(study_name="s3", storage=storage).trials
    stopped = sum(r.data.tags["ldct.status"] == "stopped" for r in runs)
    assert sorted(t.state.name for t in trials) == sorted(["COMPLETE"] * (2 - stopped) + ["PRUNED"] * stopped)


def test_extra_points_and_the_paper_label():
    from ldct.study.space import (
        extra_points,
        first_point,
        first_point_of,
        is_paper_point,
        paper_deviations,
        paper_label,
    )

    cfg = load_config("smoke", ["study.extra_points=optim.lr=0.3,optim.lr=1e-9;loss.lambda_gp=2"])
    first = first_point(cfg)
    points = extra_points(cfg)
    assert points[0] == {**first, "optim.lr": 0.3}  # not clipped to the range
    assert points[1] == {**first, "optim.lr": 1e-9, "loss.lambda_gp": 2.0}
    # λ₂ is not searched (the ratios' unit), and RED-CNN's study has only lr to change.
    for bad in ("optim.lr", "model.encoder=x", "optim.lr=fast", "loss.lambda_l1=2"):
        with pytest.raises(ValueError, match="study.extra_points"):
            extra_points(load_config("smoke", [f"study.extra_points={bad}"]))
    with pytest.raises(ValueError, match="study.extra_points.*over \\['optim.lr'\\]"):
        extra_points(load_config("redcnn", ["study.extra_points=loss.lambda_gp=2"]))
    # Only the first point is the paper's: same λ's with another lr is not.
    assert is_paper_point(first, first) and not is_paper_point(points[0], first)
    # The report rebuilds the first point from the study's logged params (lists logged as JSON).
    params = {k: tracking_store._param_value(v) for k, v in to_flat(cfg).items()}
    assert first_point_of(params) == pytest.approx(first)
    # The quick profile's first trial is "paper λ's" (λ_adv clipped to 0.1 by its range), with
    # everything else that differs named; λ_adv is searched now, so it is no deviation.
    quick = paper_deviations(load_config("quick"))
    assert first_point(load_config("quick"))["loss.lambda_adv"] == 0.1
    assert not any(d.startswith("loss.lambda_adv") for d in quick)
    assert any(d.startswith("model.encoder 'resnet10t'") for d in quick)
    assert paper_deviations(load_config("paper")) == []
    assert paper_label("quick") == "paper λ's under profile quick"


def test_the_study_summary_is_strict_json():
    import json
    import math

    from ldct.study.report import json_safe

    summary = {"best": {"iq_lcd_auc": math.nan, "psnr": 31.3, "fps": [math.inf, 2.0]}, "n": 6, "tag": "x"}
    text = json.dumps(json_safe(summary), allow_nan=False)  # raises on any NaN/inf left
    assert json.loads(text) == {
        "best": {"iq_lcd_auc": None, "psnr": 31.3, "fps": [None, 2.0]},
        "n": 6,
        "tag": "x",
    }
