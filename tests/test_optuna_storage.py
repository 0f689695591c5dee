"""The study's persistent Optuna storage: where it lives, a stale study, importances in the report.

The end-to-end part (a real study writes it, optuna.load_study / optuna-dashboard read it, a
resumed study continues it) is in tests/test_study.py.
"""

from __future__ import annotations

import json

import optuna
import pytest

from ldct.config import load_config
from ldct.study.report import write_importances
from ldct.study.run import optuna_storage, optuna_storage_url


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
    for name in ("mine", "other"):
        optuna.create_study(study_name=name, storage=url).optimize(lambda t: t.suggest_float("a", 0, 1), 1)
    storage = optuna_storage(url, "mine", fresh=True)
    assert [s.study_name for s in storage.get_all_studies()] == ["other"]
    kept = optuna_storage(url, "other", fresh=False)
    assert len(optuna.load_study(study_name="other", storage=kept).trials) == 1


def test_report_writes_parameter_importances(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    # The objective depends strongly on a, weakly on b: fANOVA must rank a first.
    study.optimize(lambda t: 10 * t.suggest_float("a", 0, 1) + 0.1 * t.suggest_float("b", 0, 1), n_trials=12)
    result = write_importances("s", url, tmp_path)
    importances = result["importances"]
    assert list(importances) == ["a", "b"] and importances["a"] > 0.8
    assert sum(importances.values()) == pytest.approx(1.0)
    json.dumps(result)  # plain floats, JSON-able for summary.json
    assert "| a |" in (tmp_path / "param_importances.md").read_text()
    assert (tmp_path / "param_importances.png").stat().st_size > 0
    assert "error" in write_importances("missing", url, tmp_path)
