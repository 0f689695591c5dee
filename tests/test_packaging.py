"""A non-editable install works outside the checkout: wheel contents, profiles, `ldct train`.

The wheel is built from a copy of the sources (setuptools writes build/ and *.egg-info next to
them) and installed, without dependencies, into a fresh venv. Reinstalling torch, Ray and MLflow
there would cost gigabytes and minutes, so the venv reaches the running environment's installed
packages through one ``.pth`` line. That line adds those site-packages directories to sys.path
but does not *process* their own ``.pth`` files (Python only does that for its site directories),
so an editable ldct there (its ``__editable__`` finder is started by a ``.pth``) stays invisible:
the test asserts that ``ldct`` is imported from the fresh venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import ldct

# The checkout these tests belong to (ldct itself may be installed elsewhere).
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("ldct", "studies"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            ".",
        ],
        cwd=src,
        check=True,
    )
    (found,) = dist.glob("ldct-*.whl")
    return found


def test_wheel_holds_every_module_and_the_profiles(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ldct").rglob("*.py")}
    missing = sorted(modules - names)
    assert not missing, f"not in the wheel (add the subpackage to [tool.setuptools] packages): {missing}"
    profiles = {f"ldct/profiles/{p.name}" for p in (ROOT / "studies").glob("*.toml")}
    assert profiles and profiles <= names
    assert wheel.name.startswith(f"ldct-{ldct.__version__}-")


def _fresh_env(tmp_path: Path, wheel: Path) -> tuple[Path, dict[str, str]]:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        check=True,
    )
    deps = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (site / "_ldct_test_deps.pth").write_text("\n".join(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        HOME=str(tmp_path / "home"),
        # The session's LDCT_HOME: the built-in set and its BM3D outputs are keyed by content and code
        # digest, so the installed copy finds the checkout's (same files) instead of remaking them.
        LDCT_HOME=os.environ["LDCT_HOME"],
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        OMP_WAIT_POLICY="PASSIVE",
    )
    return venv, env


def test_installed_ldct_runs_outside_the_checkout(tmp_path, wheel):
    venv, env = _fresh_env(tmp_path, wheel)
    work = tmp_path / "work"
    work.mkdir()

    def run(*args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            args, cwd=work, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    where = run(str(venv / "bin" / "python"), "-c", "import ldct; print(ldct.__file__)").strip()
    assert Path(where).is_relative_to(venv), where
    assert run(str(venv / "bin" / "ldct"), "--version").strip() == f"ldct {ldct.__version__}"
    listed = run(str(venv / "bin" / "ldct"), "profiles")
    assert "smoke" in listed and str(venv) in listed and str(ROOT) not in listed
    out = run(str(venv / "bin" / "ldct"), "train", "--profile", "smoke", "--workers", "0", timeout=600)
    assert "LDCT input" in out and "BM3D" in out and "mean ± std" in out
    assert (work / "runs").is_dir()  # the run went to the working directory, not into the install
