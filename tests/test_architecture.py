"""The package's shape: stages import only downward (import-linter), module size, module-level
imports, Ray Tune kept out of the lower stages, the pickle path of the study callback, and one
data source for a study and its trials (docs/DESIGN.md §1)."""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ldct"
MAX_LINES = 500
# The stages below tracking, and the bottom modules: none may name Ray Tune.
NO_TUNE = ("data", "models", "losses.py", "metrics.py", "training", "evaluation", "deploy", "cluster.py")
# Function-level imports of ldct modules allowed, with why (docs/DESIGN.md §1).
LAZY_ALLOWED = {
    # The pre-0.2 pickle path of the study's Tune callback, resolved without importing Ray Tune.
    "tracking/__init__.py": {"ldct.tracking.callbacks"},
}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imports(tree: ast.AST) -> list[tuple[ast.AST, str, bool]]:
    """Every import in a module: (node, imported module, inside a function body)."""
    found: list[tuple[ast.AST, str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((child, alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child, child.module, in_function))
                found.extend((child, f"{child.module}.{a.name}", in_function) for a in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


def test_lint_imports_keeps_every_contract():
    """The layers and forbidden contracts of pyproject.toml hold (grimp sees lazy imports too)."""
    lint = Path(sys.executable).with_name("lint-imports")
    assert lint.is_file(), f"{lint} missing: install the dev extras (pip install -e .[dev])"
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in done.stdout, done.stdout[-2000:]


def test_no_module_over_500_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"split these by job (docs/DESIGN.md §1): {long}"


def test_ldct_modules_are_imported_at_module_level():
    """A deferred import hides a cycle until the function runs; only the documented ones remain."""
    offenders = []
    for path in _modules():
        rel = str(path.relative_to(PACKAGE))
        for node, name, lazy in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if lazy and name.split(".")[0] == "ldct" and name not in LAZY_ALLOWED.get(rel, set()):
                if isinstance(node, ast.ImportFrom) and name != node.module:
                    continue  # the module itself is reported once
                offenders.append(f"{rel}:{node.lineno} {name}")
    assert not offenders, offenders


def test_no_stage_below_tracking_names_ray_tune():
    offenders = []
    for entry in NO_TUNE:
        paths = [PACKAGE / entry] if entry.endswith(".py") else sorted((PACKAGE / entry).rglob("*.py"))
        for path in paths:
            for node, name, _ in _imports(ast.parse(path.read_text(encoding="utf-8"))):
                if name == "ray.tune" or name.startswith("ray.tune."):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not offenders, offenders


def test_the_store_and_registry_load_without_ray_tune_or_mlflow():
    """`ldct-best show` / `ldct eval --model` import these: Ray Tune must not come along."""
    code = (
        "import sys, ldct.tracking.store, ldct.tracking.runs, ldct.registry.load\n"
        "print(sorted(m for m in sys.modules if m == 'ray.tune' or m.startswith(('ray.tune.', 'mlflow'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout


def test_a_callback_pickled_under_its_old_path_loads():
    """Tune pickles its callbacks with a study; one pickled before the package split (class path
    ``ldct.tracking.MLflowStudyCallback``) must load, so that the study resumes."""
    from ldct.tracking.callbacks import MLflowStudyCallback

    callback = MLflowStudyCallback("sqlite:////tmp/x.db", "s", "parent", {"train.iterations": 4})
    new = pickle.dumps(callback, protocol=2)
    assert b"cldct.tracking.callbacks\nMLflowStudyCallback\n" in new
    old = new.replace(
        b"cldct.tracking.callbacks\nMLflowStudyCallback\n", b"cldct.tracking\nMLflowStudyCallback\n"
    )
    restored = pickle.loads(old)
    assert type(restored) is MLflowStudyCallback
    assert (restored.study, restored.parent_run_id, restored.extra_params) == (
        "s",
        "parent",
        {"train.iterations": 4},
    )
    import ldct.tracking

    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        ldct.tracking.Nothing  # noqa: B018


def test_trial_runs_record_the_data_source_of_their_study(tmp_path):
    """The study's parent run and its trial runs, written by the real MLflow callback into a real
    store, carry the same data source (it drifted: trials said builtin-simulated for a cache)."""
    from ldct.config import load_config
    from ldct.study import scaffold
    from ldct.tracking.runs import data_source, start_study_run, trial_runs
    from ldct.tracking.store import client

    cache = tmp_path / "my-cache"
    cfg = load_config("smoke", [f"data.cache={cache}", "study.name=drift"])
    outputs = scaffold.Outputs(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "runs"))
    mlflow_client = client(outputs.tracking_uri)
    from ldct.config import to_flat

    flat = to_flat(cfg)
    parent = start_study_run(mlflow_client, "drift", flat, resume=False)
    opened = scaffold.Opened(cache, {"train": [], "val": [], "test": []}, mlflow_client, flat, parent)
    callback = scaffold.study_callback("drift", outputs, opened, per_trial={"optim.lr"})
    # A Tune trial as the callback sees it: its id and sampled config.
    trial = SimpleNamespace(trial_id="t0001", config={"optim.lr": 3e-4})
    callback.on_trial_start(0, [], trial)
    callback.on_trial_complete(0, [], trial)

    parent_run = mlflow_client.get_run(parent)
    (trial_run,) = trial_runs(mlflow_client, "drift", parent)
    expected = f"cache:{cache}"
    assert data_source(flat) == expected
    assert parent_run.data.tags["ldct.data_source"] == expected == trial_run.data.tags["ldct.data_source"]
    assert parent_run.data.params["data.source"] == expected == trial_run.data.params["data.source"]
    assert trial_run.data.params["optim.lr"] == "0.0003"
    assert trial_run.data.tags["ldct.status"] == "completed"
