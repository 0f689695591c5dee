"""The study's Optuna side: where its storage lives, a stale study, the architecture-aware space,
ASHA-stopped trials told as pruned, TPE's start-up, importances over complete trials.

The end-to-end part (a real study writes it, optuna.load_study / optuna-dashboard read it, a
resumed study continues it, ASHA's stop is PRUNED) is in tests/test_study.py and test_faults.py.
"""

from __future__ import annotations

import json

import optuna
import pytest

from ldct.config import from_flat, load_config, to_flat
from ldct.errors import TrainingError
from ldct.hyperparams import PAPER_POINT, RangeError
from ldct.study.report import write_importances
from ldct.study.run import optuna_storage, optuna_storage_url
from ldct.study.searcher import PruningOptunaSearch
from ldct.study.space import (
    CHOICE_KEY,
    first_point,
    search_space,
    startup_sentence,
    startup_trials,
    study_config,
    tpe_sampler,
)
from ldct.training.loop import VAL_METRIC

PRUNED, COMPLETE, FAIL = (
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.FAIL,
)


def test_storage_sits_beside_the_ray_storage_named_after_the_study(tmp_path, monkeypatch):
    cfg = load_config("smoke", ["study.name=abc"])
    assert optuna_storage_url(cfg, tmp_path / "runs") == f"sqlite:///{tmp_path / 'runs' / 'abc.optuna.db'}"
    # A remote Ray storage cannot hold SQLite: the driver's LDCT_HOME does.
    monkeypatch.setenv("LDCT_HOME", str(tmp_path / "home"))
    assert (
        optuna_storage_url(cfg, "s3://bucket/runs")
        == f"sqlite:///{tmp_path / 'home' / 'optuna' / 'abc.optuna.db'}"
    )
    shared = load_config("smoke", ["study.name=abc", "study.optuna_storage=postgresql://db/optuna"])
    assert optuna_storage_url(shared, tmp_path / "runs") == "postgresql://db/optuna"


def test_a_fresh_study_drops_a_stale_one_of_its_name_only(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    # "mine": a start that died before any trial finished (one trial asked, never told).
    optuna.create_study(study_name="mine", storage=url).ask()
    optuna.create_study(study_name="other", storage=url).optimize(lambda t: t.suggest_float("a", 0, 1), 1)
    storage = optuna_storage(url, "mine", fresh=True)
    assert [s.study_name for s in storage.get_all_studies()] == ["other"]
    kept = optuna_storage(url, "other", fresh=False)
    assert len(optuna.load_study(study_name="other", storage=kept).trials) == 1
    # A study of the same name with finished trials (another --storage, a shared database) is
    # somebody's TPE history: refused with what to do, and kept.
    with pytest.raises(TrainingError, match=r"'other'.*1 finished trial.*--name NEW.*delete-study"):
        optuna_storage(url, "other", fresh=True)
    assert len(optuna.load_study(study_name="other", storage=kept).trials) == 1


def test_report_writes_parameter_importances(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    # Seeded random points: unseeded, the sampler's draws changed fANOVA's share for a from run
    # to run (0.64 once in a full-suite run), and the test must not depend on the draw.
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(study_name="s", storage=url, direction="maximize", sampler=sampler)
    # The objective depends strongly on a, weakly on b: fANOVA must rank a first.
    study.optimize(lambda t: 10 * t.suggest_float("a", 0, 1) + 0.1 * t.suggest_float("b", 0, 1), n_trials=12)
    # A pruned trial (ASHA's stop) with a huge cut-short value: left out, and the report says so.
    pruned = study.ask()
    for name in ("a", "b"):
        pruned.suggest_float(name, 0, 1)
    pruned.report(1e6, 1)
    study.tell(pruned, state=PRUNED)
    result = write_importances("s", url, tmp_path)
    importances = result["importances"]
    assert list(importances) == ["a", "b"] and importances["a"] > 0.8
    assert (result["complete_trials"], result["pruned_left_out"]) == (12, 1)
    assert "over 12 complete trials" in (tmp_path / "param_importances.md").read_text()
    assert "1 pruned (ASHA) trial(s) left out" in (tmp_path / "param_importances.md").read_text()
    assert sum(importances.values()) == pytest.approx(1.0)
    json.dumps(result)  # plain floats, JSON-able for summary.json
    assert "| a |" in (tmp_path / "param_importances.md").read_text()
    assert (tmp_path / "param_importances.png").stat().st_size > 0
    assert "error" in write_importances("missing", url, tmp_path)
    # One complete trial: fANOVA would split the importance evenly, a number that says nothing.
    one = optuna.create_study(study_name="one", storage=url, direction="maximize")
    one.optimize(lambda t: t.suggest_float("a", 0, 1) + t.suggest_float("b", 0, 1), n_trials=1)
    assert "1 complete trial(s)" in write_importances("one", url, tmp_path)["error"]


def _searcher(cfg, points=None):
    return PruningOptunaSearch(
        space=search_space(cfg),
        metric=VAL_METRIC,
        mode="max",
        points_to_evaluate=points,
        sampler=tpe_sampler(cfg),
        iterations=cfg.train.iterations,
    )


def test_a_stopped_trial_is_pruned_with_its_intermediate_values():
    """Ray's OptunaSearch told an ASHA-stopped trial COMPLETE with its cut-short value; ours tells
    it PRUNED with every validation as an intermediate value, including the one ASHA stopped on
    (Tune shows that one to on_trial_complete only)."""
    cfg = load_config("smoke", ["train.iterations=300", "train.val_every=100"])
    searcher = _searcher(cfg)

    def result(i: int, value: float) -> dict:
        return {VAL_METRIC: value, "training_iteration": i, "step": 100 * i}

    for trial in ("stopped", "finished", "failed"):
        assert set(searcher.suggest(trial)) == set(PAPER_POINT)
        searcher.on_trial_result(trial, result(1, 30.0))
    searcher.on_trial_complete("stopped", result=result(2, 31.0))
    searcher.on_trial_result("finished", result(2, 32.0))
    searcher.on_trial_complete("finished", result=result(3, 33.0))
    searcher.on_trial_complete("failed", result=result(1, 30.0), error=True)
    stopped, finished, failed = searcher._ot_study.trials
    assert stopped.state == PRUNED and stopped.intermediate_values == {1: 30.0, 2: 31.0}
    assert stopped.value == 31.0  # Optuna records the last intermediate value of a pruned trial
    # A finished trial's last validation (Tune stops it at ASHA's max_t) is an intermediate too.
    assert finished.state == COMPLETE and finished.value == 33.0
    assert finished.intermediate_values == {1: 30.0, 2: 32.0, 3: 33.0}
    assert failed.state == FAIL
    # The rule is ldct.tracking.runs.trial_status's: stopped = ended early without an error.
    assert searcher.was_stopped(result(2, 1.0)) and not searcher.was_stopped(result(3, 1.0))
    assert not searcher.was_stopped(result(2, 1.0), error=True) and not searcher.was_stopped(None)


def test_the_space_searches_ratios_and_redcnn_searches_lr_only():
    # The paper's point is the first trial; λ₂ is not searched (it is the ratios' unit).
    quick = load_config("quick")
    assert set(first_point(quick)) == {
        "loss.lambda_perceptual",
        "loss.lambda_adv",
        "loss.lambda_gp",
        "optim.lr",
    }
    assert first_point(quick)["loss.lambda_adv"] == 0.1  # the paper's 1, clipped into [1e-4, 0.1]
    with pytest.raises(RangeError, match=r"loss\.lambda_l1 = 2: .*divide study\.lambda_perceptual_range"):
        first_point(load_config("quick", ["loss.lambda_l1=2"]))

    # RED-CNN: Optuna samples lr only; the trial's config carries λ₃ = λ_adv = 0, so the trial
    # trains with them and MLflow logs them, whatever the profile's [loss] says.
    redcnn = study_config(load_config("redcnn", ["loss.lambda_perceptual=0.2", "loss.lambda_adv=1"]))
    assert (redcnn.loss.lambda_perceptual, redcnn.loss.lambda_adv) == (0.0, 0.0)
    searcher = _searcher(redcnn, points=[first_point(redcnn)])
    config = searcher.suggest("t1")
    assert config == {"optim.lr": 1e-5, "loss.lambda_perceptual": 0.0, "loss.lambda_adv": 0.0}
    assert searcher._ot_study.trials[0].params == {"optim.lr": 1e-5}
    trained = from_flat({**to_flat(redcnn), **config})
    assert trained.loss.lambda_perceptual == 0 and trained.loss.lambda_adv == 0

    # Pareto: a RED-CNN choice fixes its zeros (and the arch) in the config, an encoder samples all.
    pareto = load_config("pareto")
    searcher = _searcher(pareto, points=[{**first_point(pareto), CHOICE_KEY: "redcnn"}])
    config = searcher.suggest("r")
    assert config[CHOICE_KEY] == "redcnn" and config["model.arch"] == "redcnn"
    assert config["loss.lambda_perceptual"] == 0.0 and config["loss.lambda_adv"] == 0.0
    assert "loss.lambda_gp" not in config and set(searcher._ot_study.trials[0].params) == {
        CHOICE_KEY,
        "optim.lr",
    }
    encoder = _searcher(pareto, points=[{**first_point(pareto), CHOICE_KEY: "resnet10t"}]).suggest("e")
    assert encoder["model.encoder"] == "resnet10t" and set(PAPER_POINT) <= set(encoder)
    assert search_space(pareto).config_keys() >= {"model.arch", "model.encoder", *PAPER_POINT}


def test_tpe_start_up_is_sized_to_the_budget():
    # Optuna's default (10 random start-up trials) exceeds the quick study's 6: TPE never ran.
    assert startup_trials(load_config("quick")) == 2 and startup_trials(load_config("paper")) == 10
    assert startup_trials(load_config("quick", ["study.startup_trials=4"])) == 4
    assert startup_sentence(2, 1, 6) == (
        "TPE after 2 start-up trials (the paper's point, 0 extra point(s), 1 random), then 4 TPE trial(s)"
    )
    assert startup_sentence(2, 3, 6).endswith("0 random), then 3 TPE trial(s)")
    assert startup_sentence(10, 1, 6).startswith("TPE never ran")
    # The study's sampler gets it (Optuna counts the enqueued paper point among the start-up).
    sampler = tpe_sampler(load_config("quick"))
    assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._n_startup_trials == 2
