"""Seed repeats (ldct repeat / studies/repeat.py) on real Ray and a real MLflow store."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from ldct.cli.repeat import main
from ldct.config import load_config
from ldct.metrics import METRIC_NAMES
from ldct.registry import versions as registry_versions
from ldct.study.repeat import RepeatResult, arms_for
from ldct.study.repeat_report import markdown, paired_test, summarise, summary_of
from ldct.study.space import first_point
from ldct.tracking import runs as tracking_runs
from ldct.tracking import store as tracking_store
from ldct.training.loop import run_local


def test_paired_statistics_match_their_definitions():
    rng = np.random.default_rng(3)
    a = rng.normal(30, 0.2, 5)
    b = a - rng.uniform(0.05, 0.15, 5)
    out = paired_test(a.tolist(), b.tolist())
    d = a - b
    assert out["mean"] == pytest.approx(d.mean()) and out["std"] == pytest.approx(d.std(ddof=1))
    t = d.mean() / (d.std(ddof=1) / np.sqrt(d.size))
    assert out["t_p"] == pytest.approx(2 * stats.t.sf(abs(t), d.size - 1))
    # All five differences positive: the exact Wilcoxon p is its floor 2/2^5.
    assert (d > 0).all() and out["wilcoxon_p"] == pytest.approx(2 / 2**5) == out["wilcoxon_min_p"]
    assert np.isnan(summarise([1.0])["std"]) and summarise([1.0, 3.0])["std"] == pytest.approx(np.sqrt(2))


def test_arms_take_the_configuration_from_the_source_and_the_budget_from_the_profile():
    base = load_config("smoke")
    source = {"model.arch": "redcnn", "loss.lambda_l1": 2.0, "optim.lr": 3e-4, "train.iterations": 999}
    arms = arms_for(base, source, also_paper=True)
    assert arms["source"] == {"model.arch": "redcnn", "loss.lambda_l1": 2.0, "optim.lr": 3e-4}
    assert arms["paper"]["model.arch"] == "redcnn" and arms["paper"]["loss.lambda_l1"] == 1.0
    # The paper arm is the study's first trial: the paper's values clipped into the profile's ranges.
    assert {k: arms["paper"][k] for k in first_point(base)} == first_point(base)


@pytest.mark.slow
def test_smoke_repeat_two_seeds(tmp_path, ray_local, capsys):
    # Two seeds, not three: the smallest sample with a std (ddof=1); each seed is a Train run.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A registered version to repeat (2 local smoke iterations, lr changed so it is not the paper's).
    session = run_local(load_config("smoke", ["train.iterations=2", "optim.lr=3e-4"]), tmp_path / "ckpt")
    from ldct.training.checkpoint import load_state

    mlflow_client = tracking_store.client(uri)
    run = mlflow_client.create_run(tracking_store.ensure_experiment(mlflow_client, "ldct/src"))
    state = load_state(session.checkpoints[-1])
    version = registry_versions.register_state(state, run.info.run_id, uri, onnx=False).version

    results = tmp_path / "results"
    code = main(
        [
            "--version", str(version), "--seeds", "2", "--profile", "smoke",
            "--tracking-uri", uri, "--storage", str(tmp_path / "runs"), "--results", str(results),
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    name = f"repeat-v{version}"
    parent = tracking_runs.study_run(mlflow_client, name)
    assert parent is not None and parent.info.run_name == name
    runs = tracking_runs.trial_runs(mlflow_client, name)
    assert len(runs) == 2
    assert {r.data.tags[tracking_store.PARENT_TAG] for r in runs} == {parent.info.run_id}
    seeds = sorted(int(r.data.params["train.seed"]) for r in runs)
    assert len(set(seeds)) == 2
    # The source's configuration ran, with the profile's budget.
    assert {float(r.data.params["optim.lr"]) for r in runs} == {3e-4}
    assert {int(r.data.params["train.iterations"]) for r in runs} == {4}

    summary = json.loads((results / name / "repeat.json").read_text())
    arm = summary["arms"]["source"]
    assert sorted(arm["seeds"]) == seeds
    report = (results / name / "repeat.md").read_text()
    for metric in METRIC_NAMES:
        values = np.array([r.data.metrics[f"test_denoised_{metric}"] for r in runs])
        assert arm["metrics"][metric]["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert arm["metrics"][metric]["std"] == pytest.approx(values.std(ddof=1), rel=1e-12)
    # The real panel's LDCT and BM3D rows, scored once, are in the report and on the parent run.
    assert {"ldct", "bm3d"} <= set(summary["classical"])
    parent_metrics = tracking_store.client(uri).get_run(parent.info.run_id).data.metrics
    assert parent_metrics["test_bm3d_psnr_window"] == pytest.approx(
        summary["classical"]["bm3d"]["psnr_window"]
    )
    assert "LDCT input" in report and "BM3D" in report
    psnr = arm["metrics"]["psnr_window"]
    assert f"{psnr['mean']:.2f} ± {psnr['std']:.2f}" in report


def test_report_pairs_the_arms_by_seed():
    rng = np.random.default_rng(0)
    runs = []
    for arm, shift in (("source", 0.3), ("paper", 0.0)):
        for seed in (0, 1, 2, 3):
            test = {m: float(rng.normal(30 + shift, 0.1)) for m in METRIC_NAMES}
            runs.append(
                {"run_id": f"{arm}{seed}", "arm": arm, "seed": seed, "status": "completed", "test": test}
            )
    runs.append({"run_id": "x", "arm": "paper", "seed": 4, "status": "failed", "test": None})
    classical = {k: dict.fromkeys(METRIC_NAMES, 1.0) for k in ("ldct", "gaussian", "bm3d")}
    labels = {"ldct": "LDCT input", "gaussian": "Gaussian σ=1px", "bm3d": "BM3D σ_psd=30HU"}
    result = RepeatResult(
        "repeat-x", "sqlite://", "p", [0, 1, 2, 3, 4], runs, classical, labels, ["grid"], 60.0
    )
    summary = summary_of(result)
    assert summary["arms"]["paper"]["failed_seeds"] == [4] and summary["paired"]["seeds"] == [0, 1, 2, 3]
    by = {(r["arm"], r["seed"]): r["test"]["psnr_window"] for r in runs if r["test"]}
    diff = np.array([by["source", s] - by["paper", s] for s in range(4)])
    paired = summary["paired"]["metrics"]["psnr_window"]
    assert paired["mean"] == pytest.approx(diff.mean()) and paired["std"] == pytest.approx(diff.std(ddof=1))
    text = markdown(summary, load_config("smoke"), {"source": "x configuration", "paper": "paper λ's"})
    assert "x configuration − paper λ's, paired by seed (n=4)" in text and "failed seeds: [4]" in text
    assert f"{paired['mean']:+.4f}" in text and "- grid" in text
