"""Repeats (ldct repeat / studies/repeat.py): seeds and LOSO, on real Ray and a real MLflow store."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from ldct.cli.repeat import main
from ldct.config import load_config
from ldct.data.builtin import real_source
from ldct.data.dicom import read_hu
from ldct.evaluation.baselines import BM3DCache, EstimatedSigmaBM3D
from ldct.hyperparams import PAPER_POINT
from ldct.metrics import METRIC_NAMES
from ldct.registry import versions as registry_versions
from ldct.study import loso, loso_report
from ldct.study.arms import ArmError, build_arms, lr_grid, parse_also
from ldct.study.endpoints import Endpoint, EndpointError, check_endpoints, met, parse_endpoint, t_interval
from ldct.study.repeat import RepeatResult
from ldct.study.repeat_report import markdown, paired_test, summarise, summary_of
from ldct.tracking import runs as tracking_runs
from ldct.tracking import store as tracking_store
from ldct.training.checkpoint import load_state
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


TUNED_SOURCE = {
    "model.arch": "encoder_decoder",
    "loss.lambda_l1": 1.0,
    "loss.lambda_perceptual": 0.37,
    "loss.lambda_adv": 2e-3,
    "loss.lambda_gp": 4.0,
    "optim.lr": 1.6e-3,
    "train.iterations": 999,
}


def test_arms_separate_the_loss_weights_from_the_learning_rate():
    base = load_config("smoke")
    arms = build_arms(base, TUNED_SOURCE, parse_also(["paper-matched,l1", "l1+perceptual", "l1+adv", "all"]))
    # The configuration comes from the source, the budget (train.*) from the profile.
    assert arms["tuned"] == {k: v for k, v in TUNED_SOURCE.items() if not k.startswith("train.")}
    assert list(arms) == ["tuned", "paper-matched", "l1", "l1+perceptual", "l1+adv"]  # all = tuned
    # paper-matched: the paper's loss weights at the TUNED lr (not the paper's 1e-5).
    paper = arms["paper-matched"]
    assert paper["optim.lr"] == 1.6e-3 != PAPER_POINT["optim.lr"]
    assert all(paper[k] == v for k, v in PAPER_POINT.items() if k.startswith("loss."))
    assert paper["loss.lambda_l1"] == 1.0
    # Ablations: the tuned weights with terms switched off, all at the tuned lr.
    assert arms["l1"]["loss.lambda_perceptual"] == 0.0 == arms["l1"]["loss.lambda_adv"]
    assert (
        arms["l1+perceptual"]["loss.lambda_perceptual"] == 0.37
        and arms["l1+perceptual"]["loss.lambda_adv"] == 0
    )
    assert arms["l1+adv"]["loss.lambda_perceptual"] == 0.0 and arms["l1+adv"]["loss.lambda_adv"] == 2e-3
    assert {a["optim.lr"] for a in arms.values()} == {1.6e-3}
    # RED-CNN: its own architecture, pixel loss only, the profile's lr unless a study gives one.
    red = build_arms(base, TUNED_SOURCE, ["redcnn"])["redcnn"]
    assert red["model.arch"] == "redcnn" and red["loss.lambda_adv"] == 0.0 == red["loss.lambda_perceptual"]
    assert red["optim.lr"] == base.optim.lr
    red = build_arms(base, TUNED_SOURCE, ["redcnn"], redcnn_source={"optim.lr": 7e-4, "train.seed": 3})[
        "redcnn"
    ]
    assert red["optim.lr"] == 7e-4 and "train.seed" not in red
    assert lr_grid({"tuned": arms["tuned"]})["tuned"] == pytest.approx([1.6e-3 / 3, 1.6e-3, 4.8e-3])
    # The old arm changed λ's and lr together: refused, pointing to the new one.
    with pytest.raises(ArmError, match="paper-matched"):
        parse_also(["paper"])
    with pytest.raises(ArmError, match="unknown arm"):
        parse_also(["l2"])


def test_t_interval_and_endpoints_known_answers():
    # Student t, 4 df: t_0.975 = 2.7764451 (tables); mean 3, sd sqrt(2.5).
    out = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * np.sqrt(2.5) / np.sqrt(5)
    assert out["t"] == pytest.approx(2.7764451051977987) and out["mean"] == 3.0
    assert (out["low"], out["high"]) == pytest.approx((3.0 - half, 3.0 + half))
    assert np.isnan(t_interval([1.0])["low"])
    methods = ["tuned", "paper-matched", "l1+adv", "ldct", "bm3d"]
    e = parse_endpoint("psnr_body:tuned-paper-matched>=0.5", methods)
    assert (e.metric, e.arm, e.reference, e.op, e.margin) == (
        "psnr_body",
        "tuned",
        "paper-matched",
        ">=",
        0.5,
    )
    assert parse_endpoint("rmse_body_hu:paper-matched-ldct<=-3", methods).arm == "paper-matched"
    with pytest.raises(EndpointError, match="unknown metric"):
        parse_endpoint("psnr_bodyy:tuned-ldct>=4", methods)
    with pytest.raises(EndpointError, match="--also"):
        check_endpoints(load_config("smoke", ["study.primary_endpoint=psnr_body:l1-ldct>=1"]), ["tuned"])
    # Met: mean past the margin AND the interval on the arm's side of 0.
    gain = Endpoint("x", "psnr_body", "tuned", "ldct", ">=", 4.0)
    assert met(gain, {"mean": 4.2, "low": 0.1}) and not met(gain, {"mean": 4.2, "low": -0.1})
    assert not met(gain, {"mean": 3.9, "low": 2.0})
    drop = Endpoint("x", "rmse_body_hu", "tuned", "ldct", "<=", -3.0)
    assert met(drop, {"mean": -4.0, "high": -0.5}) and not met(drop, {"mean": -4.0, "high": 0.5})


def test_loso_averages_realizations_then_seeds_then_pairs_by_slice():
    def row(fold, method, seed, r, value):
        return {
            "fold": fold,
            "method": method,
            "seed": seed,
            "realization": r,
            "metrics": {"psnr_body": value},
        }

    rows = [
        # Slice A, tuned: seed 0 has two realizations (mean 15), seed 1 one (30): (15 + 30) / 2,
        # not the flat mean 20 of the three cells.
        row("A", "tuned", 0, 0, 10.0), row("A", "tuned", 0, 1, 20.0), row("A", "tuned", 1, 0, 30.0),
        row("A", "ldct", None, 0, 5.0), row("A", "ldct", None, 1, 7.0),
        row("B", "tuned", 0, 0, 12.0), row("B", "ldct", None, 0, 10.0),
        row("C", "ldct", None, 0, 1.0),  # no tuned run on C: C drops out of the pairing
    ]  # fmt: skip
    assert loso_report.slice_values(rows, "tuned", "psnr_body") == {"A": 22.5, "B": 12.0}
    out = loso_report.paired(rows, "tuned", "ldct", "psnr_body")
    assert out["per_slice"] == {"A": 22.5 - 6.0, "B": 2.0}
    assert out["n"] == 2 and out["mean"] == pytest.approx((16.5 + 2.0) / 2)
    assert out["low"] == pytest.approx(
        out["mean"] - 12.706204736174707 * np.std([16.5, 2.0], ddof=1) / np.sqrt(2)
    )


def test_loso_realizations_are_paired_and_bm3d_estimates_its_sigma(tmp_path):
    full, meta = read_hu(real_source("SPINE"))
    full = full[200:296, 200:296]  # a 96² crop: the simulation's cost grows with the image
    info = {"i0": 37600.0, "pixel_size_mm": float(np.mean(meta["spacing"]))}
    lows = loso.realizations(full, "SPINE", info, 0.25, 2, seed=0)
    # Deterministic per (seed, slice, realization): every arm and baseline sees the same K images ...
    assert np.array_equal(loso.realizations(full, "SPINE", info, 0.25, 1, seed=0)[0], lows[0])
    # ... and the K images are K draws of the noise, at the slice's own shape.
    assert lows[0].shape == full.shape and not np.array_equal(lows[0], lows[1])
    assert min(float(np.std(low - full)) for low in lows) > 5.0  # HU: quarter dose inserted, not a copy
    out, sigma = loso.bm3d_estimated(lows[0], info["pixel_size_mm"], EstimatedSigmaBM3D(BM3DCache(tmp_path)))
    assert sigma > 0 and out.shape == full.shape
    assert np.sqrt(np.mean((out - full) ** 2)) < np.sqrt(np.mean((lows[0] - full) ** 2))


def test_loso_folds_are_the_real_slices_and_never_train_on_their_test_slice():
    patients = ["PH01", "PH02", "PH03", "ABDOMEN", "CTSMALL", "HEAD693", "HEADJ2K", "SPINE"]
    assert loso.fold_names(patients) == ["ABDOMEN", "CTSMALL", "HEAD693", "HEADJ2K", "SPINE"]
    assert loso.fold_names(patients, "SPINE, ABDOMEN") == ["ABDOMEN", "SPINE"]
    with pytest.raises(loso.LosoError, match=r"unknown slice\(s\) \['LIVER'\]; choose from ABDOMEN"):
        loso.fold_names(patients, "ABDOMEN,LIVER")
    with pytest.raises(loso.LosoError, match="no choice may be made on a real slice"):
        loso.fold_splits({"train": ["PH01"], "val": ["HEAD693"], "test": ["PH02"]}, "SPINE")
    with pytest.raises(loso.LosoError, match="built-in set's real slices"):
        loso.fold_names(["P1", "P2"])
    splits = {"train": ["PH01", "HEADJ2K", "SPINE", "HEAD693"], "val": ["PH02"], "test": ["PH03", "ABDOMEN"]}
    fold = loso.fold_splits(splits, "SPINE")
    # The default test patient trains; only the fold's slice is held out, validation stays a phantom.
    assert fold == {
        "train": ["ABDOMEN", "HEAD693", "HEADJ2K", "PH01", "PH03"],
        "val": ["PH02"],
        "test": ["SPINE"],
    }


def _registered_version(tmp_path, uri: str) -> str:
    """A registered version to repeat (2 local smoke iterations, lr changed so it is not the paper's)."""
    session = run_local(load_config("smoke", ["train.iterations=2", "optim.lr=3e-4"]), tmp_path / "ckpt")
    mlflow_client = tracking_store.client(uri)
    run = mlflow_client.create_run(tracking_store.ensure_experiment(mlflow_client, "ldct/src"))
    state = load_state(session.checkpoints[-1])
    return str(registry_versions.register_state(state, run.info.run_id, uri, onnx=False).version)


@pytest.mark.slow
def test_smoke_repeat_two_seeds(tmp_path, ray_local, capsys):
    # Two seeds, not three: the smallest sample with a std (ddof=1); each seed is a Train run.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = _registered_version(tmp_path, uri)
    mlflow_client = tracking_store.client(uri)

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
    arm = summary["arms"]["tuned"]
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
    for arm, shift in (("tuned", 0.3), ("paper-matched", 0.0)):
        for seed in (0, 1, 2, 3):
            test = {m: float(rng.normal(30 + shift, 0.1)) for m in METRIC_NAMES}
            runs.append(
                {"run_id": f"{arm}{seed}", "arm": arm, "seed": seed, "status": "completed", "test": test}
            )
    runs.append({"run_id": "x", "arm": "paper-matched", "seed": 4, "status": "failed", "test": None})
    classical = {k: dict.fromkeys(METRIC_NAMES, 1.0) for k in ("ldct", "gaussian", "bm3d")}
    labels = {"ldct": "LDCT input", "gaussian": "Gaussian σ=1px", "bm3d": "BM3D σ_psd=30HU"}
    result = RepeatResult(
        "repeat-x", "sqlite://", "p", [0, 1, 2, 3, 4], runs, classical, labels, ["grid"], 60.0
    )
    summary = summary_of(result)
    assert summary["arms"]["paper-matched"]["failed_seeds"] == [4] and summary["paired"]["seeds"] == [
        0,
        1,
        2,
        3,
    ]
    by = {(r["arm"], r["seed"]): r["test"]["psnr_window"] for r in runs if r["test"]}
    diff = np.array([by["tuned", s] - by["paper-matched", s] for s in range(4)])
    paired = summary["paired"]["metrics"]["psnr_window"]
    assert paired["mean"] == pytest.approx(diff.mean()) and paired["std"] == pytest.approx(diff.std(ddof=1))
    text = markdown(summary, load_config("smoke"), {"tuned": "x configuration", "paper-matched": "paper λ's"})
    assert "x configuration − paper λ's, paired by seed (n=4)" in text and "failed seeds: [4]" in text
    assert f"{paired['mean']:+.4f}" in text and "- grid" in text


@pytest.mark.slow
def test_smoke_loso_two_folds(tmp_path, ray_local, capsys):
    # Two real slices as folds, 1 seed, 2 realizations; no BM3D row (~10-50 s per 512² slice here:
    # test_loso_realizations_are_paired_and_bm3d_estimates_its_sigma covers it on CTSMALL).
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = _registered_version(tmp_path, uri)
    results = tmp_path / "results"
    code = main(
        [
            "--version", version, "--protocol", "loso", "--folds", "SPINE,CTSMALL", "--seeds", "1",
            "--realizations", "2", "--no-bm3d", "--profile", "smoke", "--set", "data.val_patients=PH01",
            "--set", "study.secondary_endpoints=[]",
            "--tracking-uri", uri, "--storage", str(tmp_path / "runs"), "--results", str(results),
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    name = f"repeat-v{version}-loso"
    summary = json.loads((results / name / "repeat.json").read_text())
    folds = ["CTSMALL", "SPINE"]
    assert summary["folds"] == folds and summary["realizations"] == 2 and summary["checkpoint"] == "last"
    # Every scored model is its run's LAST checkpoint (step = the smoke budget, 4).
    assert [(r["fold"], r["step"]) for r in summary["runs"]] == [("CTSMALL", 4), ("SPINE", 4)]
    for fold in folds:
        row = summary["slices"][fold]
        assert {"effective_dose", "native_sigma_hu", "i0", "window", "looked_at"} <= set(row)
        assert set(row["methods"]) == {"ldct", "tuned"}
        for method in ("ldct", "tuned"):
            cells = [r for r in summary["rows"] if r["fold"] == fold and r["method"] == method]
            assert [c["realization"] for c in cells] == [0, 1]
            mean = np.mean([c["metrics"]["psnr_body"] for c in cells])
            assert row["methods"][method]["psnr_body"] == pytest.approx(mean)
        # Two realizations of the noise, not one image twice.
        ldct = [
            r["metrics"]["rmse_body_hu"]
            for r in summary["rows"]
            if r["fold"] == fold and r["method"] == "ldct"
        ]
        assert ldct[0] != ldct[1]
    primary = summary["primary_endpoint"]
    assert primary["text"] == load_config("smoke").study.primary_endpoint and primary["role"] == "primary"
    assert primary["n"] == 2 and set(primary["per_slice"]) == set(folds) and isinstance(primary["met"], bool)
    report = (results / name / "repeat.md").read_text()
    assert report.splitlines()[2].startswith("Primary endpoint") and "SPINE" in report

    # MLflow: one parent, one nested run per fold; each trained without its test slice.
    mlflow_client = tracking_store.client(uri)
    parent = tracking_runs.study_run(mlflow_client, name)
    runs = tracking_runs.trial_runs(mlflow_client, name)
    assert parent is not None and len(runs) == 2
    assert {r.data.tags[tracking_store.PARENT_TAG] for r in runs} == {parent.info.run_id}
    for run in runs:
        params = run.data.params
        fold, train = params["loso_fold"], params["loso_train"].split(",")
        assert params["loso_test"] == fold and fold not in train and params["loso_val"] == "PH01"
        assert set(folds) - {fold} <= set(train) and "PH01" not in train
        assert "test_denoised_psnr_body" in run.data.metrics
    assert "primary_psnr_body_mean" in mlflow_client.get_run(parent.info.run_id).data.metrics


def test_loso_endpoint_missing_a_fold_is_not_evaluable_rather_than_met():
    def row(fold, method, value):
        return {"fold": fold, "method": method, "seed": None if method == "ldct" else 0, "realization": 0,
                "metrics": {m: value for m in METRIC_NAMES}}  # fmt: skip

    # The tuned arm gains 5 dB on A and B; its run on C failed (no row): a verdict over two of the
    # three folds would read "met" for a question the protocol did not ask.
    rows = [row("A", "ldct", 20.0), row("A", "tuned", 25.0), row("B", "ldct", 22.0), row("B", "tuned", 27.1),
            row("C", "ldct", 21.0)]  # fmt: skip
    cfg = load_config(
        "smoke", ["study.primary_endpoint=psnr_body:tuned-ldct>=1.0", "study.secondary_endpoints=[]"]
    )
    slices = {f: {"effective_dose": 0.25, "native_sigma_hu": 10.0, "i0": 1e5, "pixel_size_mm": 0.7,
                  "body_part": "", "window": [-160.0, 240.0], "looked_at": "never", "calibrated": True}
              for f in "ABC"}  # fmt: skip
    runs = [{"run_id": None, "arm": "tuned", "fold": "C", "seed": 0, "status": "failed", "test": None}]
    result = loso.LosoResult(
        "r", "sqlite:///x.db", "p", ["A", "B", "C"], [0], 1, 0.25, {"tuned": {}}, ["ldct"], slices, rows,
        runs, None, 1.0,
    )  # fmt: skip
    primary = loso_report.summary_of(result, cfg)["primary_endpoint"]
    assert primary["met"] is None and primary["missing_folds"] == ["C"] and primary["n"] == 2
    text = loso_report.markdown(loso_report.summary_of(result, cfg))
    assert "not evaluable" in text and "**met**" not in text
    # With every fold present the same gains are judged.
    rows.append(row("C", "tuned", 26.0))
    assert loso_report.summary_of(result, cfg)["primary_endpoint"]["met"] is True
