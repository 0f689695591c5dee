"""Tracking: `ldct train` logs a run, params go in batches, artifacts stay beside a SQLite store."""

from __future__ import annotations

import json
import math
import traceback
from pathlib import Path
from urllib.parse import unquote

import pytest

from ldct.cli import main
from ldct.errors import TrainingError
from ldct.metrics import METRIC_NAMES
from ldct.tracking import runs as tracking_runs
from ldct.tracking import store as tracking_store
from ldct.tracking.callbacks import summarise_error_text
from ldct.training.engine import NonFiniteLossError
from ldct.training.loop import VAL_METRIC


def test_artifact_root_is_beside_the_sqlite_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    mlflow_client = tracking_store.client(f"sqlite:///{db}")
    experiment_id = tracking_store.ensure_experiment(mlflow_client, "ldct/x")
    location = mlflow_client.get_experiment(experiment_id).artifact_location
    assert location == (db.parent / "mlartifacts" / "ldct_x").as_uri()
    assert tracking_store.artifact_root("http://127.0.0.1:5000") is None  # a server decides for itself
    # The study prints where its runs and artifacts are, and the UI link.
    text = tracking_store.describe_store(mlflow_client, "x")
    assert str(db.parent / "mlartifacts") in text and "workflowType=machine_learning" in text
    assert "compare-runs" not in text  # no trial yet: nothing to compare
    with pytest.raises(tracking_store.TrackingError, match="no runs to compare"):
        tracking_store.compare_url("http://h:5000", experiment_id, [])
    # With trials, MLflow's compare view of the latest invocation's, best first; neither the
    # parent run nor an earlier invocation's trial (a study name resubmitted) is among them.
    study_tags = {tracking_store.TAG_STUDY: "x", tracking_store.TAG_ROLE: "study"}
    earlier = mlflow_client.create_run(experiment_id, tags=study_tags, start_time=1)
    old_trial = mlflow_client.create_run(
        experiment_id,
        tags={tracking_store.TAG_ROLE: "trial", tracking_store.PARENT_TAG: earlier.info.run_id},
    )
    mlflow_client.log_metric(old_trial.info.run_id, tracking_store.BEST_METRIC, 40.0)
    parent = mlflow_client.create_run(experiment_id, tags=study_tags, start_time=2)
    ids = {}
    for name, psnr in [("low", 30.0), ("high", 32.0)]:
        run = mlflow_client.create_run(
            experiment_id,
            tags={tracking_store.TAG_ROLE: "trial", tracking_store.PARENT_TAG: parent.info.run_id},
            run_name=name,
        )
        mlflow_client.log_metric(run.info.run_id, tracking_store.BEST_METRIC, psnr)
        ids[name] = run.info.run_id
    text = tracking_store.describe_store(mlflow_client, "x")
    link = text.splitlines()[-1].split()[-1]
    route, _, query = link.partition("#/compare-runs?")
    assert route == "http://127.0.0.1:5000/"
    fields = dict(part.split("=", 1) for part in query.split("&"))
    assert json.loads(unquote(fields["runs"])) == [ids["high"], ids["low"]]
    assert json.loads(unquote(fields["experiments"])) == [experiment_id]


def test_best_metric_names_follow_the_objective():
    # store.py spells the name out (it stays free of torch); it must be the objective's.
    assert VAL_METRIC == "val_psnr_body" and tracking_store.BEST_METRIC == f"best_{VAL_METRIC}"
    assert f"metrics.%60{tracking_store.BEST_METRIC}%60" in tracking_store.ui_url("http://h:5000", "1")


def test_trial_run_name_carries_the_lambdas():
    # The tuned values only: λ₂ is fixed at 1 (the ratios' unit), so it is not in the name.
    name = tracking_runs.trial_run_name(
        "a1b2",
        {
            "loss.lambda_l1": 1.0,
            "loss.lambda_perceptual": 0.1,
            "loss.lambda_adv": 0.01,
            "loss.lambda_gp": 10,
            "optim.lr": 1e-5,
        },
    )
    assert name == "a1b2 λ3=0.1 λadv=0.01 λgp=10 lr=1e-05"


def test_ldct_train_logs_a_run(tmp_path, monkeypatch, capsys):
    """In-process `ldct train` against a SQLite store: params (one batch), every validation, the
    best checkpoint, the test table, git commit and data source; nothing in the working directory."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(
        ["train", "--profile", "smoke", "--workers", "0", "--storage", str(tmp_path / "runs"),
         "--tracking-uri", uri, "--set", "train.iterations=4"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "MLflow run" in capsys.readouterr().out
    mlflow_client = tracking_store.client(uri)
    experiment = mlflow_client.get_experiment_by_name("ldct/train")
    (run,) = mlflow_client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.encoder"] == "resnet10t"
    assert run.data.params["data.source"] == "builtin-simulated"
    assert run.data.params["best_step"] in ("2", "4")
    assert len(run.data.tags["ldct.git_commit"]) >= 40
    for metric in ("val_psnr_body", "val_ssim_body", "val_rmse_body_hu", "val_psnr_window"):
        assert [m.step for m in mlflow_client.get_metric_history(run.info.run_id, metric)] == [2, 4]
    assert run.data.metrics["test_denoised_psnr_window"] > 0 and "test_ldct_ssim_full" in run.data.metrics
    assert (
        run.data.metrics["test_denoised_psnr_body"] > 0 and "test_bm3d_est_rmse_body_hu" in run.data.metrics
    )
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert {"checkpoint", "panel.png", "test_table.json"} <= artifacts
    table = json.loads(
        Path(mlflow_client.download_artifacts(run.info.run_id, "test_table.json", str(tmp_path))).read_text()
    )
    assert set(table) == {"ldct", "classical", "bm3d", "bm3d_est", "denoised"}
    assert list(work.iterdir()) == []
    assert (tmp_path / "mlartifacts" / "ldct_train").is_dir()


def test_params_are_logged_in_batches(tmp_path):
    """60 params: one log_batch round trip, read back complete (counted on the real client)."""
    mlflow_client = tracking_store.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mlflow_client.create_run(tracking_store.ensure_experiment(mlflow_client, "ldct/p"))
    calls = []
    real = mlflow_client.log_batch
    mlflow_client.log_batch = lambda *a, **k: calls.append(len(k.get("params", []))) or real(*a, **k)
    tracking_store.log_params(mlflow_client, run.info.run_id, {f"p.k{i}": i for i in range(160)})
    assert calls == [100, 60]
    assert len(mlflow_client.get_run(run.info.run_id).data.params) == 160


@pytest.mark.slow
def test_ldct_train_under_ray_logs_each_validation(tmp_path, ray_local, monkeypatch, capsys):
    """The Ray Train path: a Train callback logs every validation as it happens; `--json` prints
    the test table (every row, every metric, finite) as the last line."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(
        ["train", "--profile", "smoke", "--workers", "1", "--storage", str(tmp_path / "runs"),
         "--tracking-uri", uri, "--set", "train.iterations=4", "--set", "train.cpus_per_worker=0.5", "--json"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    table = json.loads(captured.out.strip().splitlines()[-1])
    assert set(table) == {"ldct", "classical", "bm3d", "bm3d_est", "denoised"}
    for row in table.values():
        assert set(METRIC_NAMES) <= set(row)
        assert all(math.isfinite(v) for v in row.values())
    mlflow_client = tracking_store.client(uri)
    (run,) = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("ldct/train").experiment_id])
    assert [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "val_psnr_window")] == [2, 4]
    assert "checkpoint" in {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}


def _worker_traceback(chained: bool = True) -> str:
    """The traceback of a Train worker whose critic loss turned NaN (as loop.py raises it).

    ``chained=False``: the same TrainingError as it comes back across Ray, without the
    NonFiniteLossError it was raised from (the trial's error file showed no whole line of it).
    """
    try:
        try:
            # The code lines of a traceback name the errors too: the summary must not take them.
            raise NonFiniteLossError(3, {"loss_critic": float("nan")})
        except NonFiniteLossError as exc:
            message = f"{exc} (run stopped; worker rank 0; last good checkpoint at step 2)"
            raise TrainingError(message) from (exc if chained else None)
    except TrainingError:
        return traceback.format_exc()


@pytest.mark.parametrize("path_chars", range(0, 700, 23))
def test_error_summary_keeps_the_whole_line_whatever_rays_snippet_cut(path_chars):
    # The error file as Tune writes it: Train V2's WorkerGroupError with each worker's traceback
    # cut to its first and last 500 characters by Ray's own helper, then the worker's exception
    # re-raised by ldct.training.ray_train.fit. Longer paths in the traceback (another checkout
    # directory) move the cut; CI once cut the NonFiniteLossError line before "step 3".
    from ray.train.v2._internal.execution.worker_group.poll import _truncate_error_string

    worker = (
        f'  File "/{"d" * path_chars}/ldct/training/engine.py", line 221, in _checked\n' + _worker_traceback()
    )
    text = (
        "Failure # 1\nray.train.WorkerGroupError: Training failed due to worker errors:\n"
        f"[Rank 0 Error Snippet]:\n{_truncate_error_string(worker)}\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        + _worker_traceback(chained=False)
    )
    summary = summarise_error_text(text)
    assert "loss_critic (nan)" in summary and "step 3" in summary and not summary.endswith("..."), summary


def test_error_summary_of_an_unknown_failure_is_its_last_line():
    assert summarise_error_text("Traceback:\n  File x\nValueError: bad shape\n\n") == "ValueError: bad shape"
    assert "empty" in summarise_error_text("\n\n")
