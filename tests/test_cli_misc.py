"""CLI conventions: `--version`, `--debug` / LDCT_DEBUG, `--model-version`, `ldct profiles`, empty registry."""

from __future__ import annotations

import pytest

import ldct
from ldct.cli import best_main, main
from ldct.config import list_profiles


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"ldct {ldct.__version__}"
    with pytest.raises(SystemExit):
        best_main(["--version"])
    assert capsys.readouterr().out.strip() == f"ldct-best {ldct.__version__}"


def test_version_has_one_source():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_and_keeps_the_one_line(tmp_path, capsys, monkeypatch, how):
    monkeypatch.setenv("LDCT_DEBUG", "1" if how == "env" else "")
    argv = ["eval", "--data", str(tmp_path / "missing"), "--no-bm3d"]
    assert main(argv) == 1
    plain = capsys.readouterr().err
    if how == "env":
        assert "Traceback" in plain
    else:
        assert "Traceback" not in plain
        assert main(["--debug", *argv]) == 1
        plain = capsys.readouterr().err
        assert "Traceback" in plain
    # The last line is still the one-line error, naming the path.
    assert plain.strip().splitlines()[-1].startswith("ldct: error:") and "missing" in plain


def test_best_show_with_nothing_registered_says_so_on_stderr(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert best_main(["--tracking-uri", uri, "show"]) == 1
    captured = capsys.readouterr()
    assert "no registered versions" in captured.err and captured.out == ""
    # --model-version is the new spelling; --version stays as its alias; both reach the registry.
    for spelling in ("--model-version", "--version"):
        assert best_main(["--tracking-uri", uri, "export", spelling, "7", "--out", str(tmp_path / "x")]) == 1
        assert "no version 7" in capsys.readouterr().err


def test_profiles_lists_every_profile(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    profiles = list_profiles()
    assert {"smoke", "quick", "paper"} <= set(profiles)
    for name, path in profiles.items():
        assert name in out and str(path) in out


def test_study_hands_its_options_to_the_study_parser(capsys):
    assert main(["study", "--profile", "no-such-profile", "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldct study: error: no profile 'no-such-profile'") and "ldct profiles" in err
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    assert "--resume" in capsys.readouterr().out


def test_the_study_summary_shares_step_time_among_trials_run_side_by_side():
    from ldct.cli.study import steps_line

    # The 2026-12-07 quick study: 23.7 min of steps in 14.8 min of wall time, two trials at a time.
    line = steps_line(23.7 * 60, 14.8 * 60, 2)
    assert "23.7 min summed over trials, up to 2 at a time" in line and "(80 % of 2 x the wall time)" in line
    assert steps_line(60.0, 120.0, 1) == "training steps took 1.0 min (50 % of the wall time)"
