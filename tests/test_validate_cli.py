"""`ldct-best validate --backend/--precision` and `denoise --backend openvino` against a real MLflow store.

A smoke-trained generator is registered in a SQLite store; its built-in data (and so the gate's
test panel and the int8 calibration slices) live under a temporary LDCT_HOME.
"""

from __future__ import annotations

import json

import mlflow
import pytest

from ldct.cli import best_main
from ldct.config import load_config
from ldct.registry import versions as registry_versions
from ldct.tracking import store as tracking_store
from ldct.training.checkpoint import load_state
from ldct.training.loop import run_local


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LDCT_HOME", str(root / "home"))
        uri = f"sqlite:///{root / 'mlflow.db'}"
        session = run_local(load_config("smoke", ["train.iterations=2"]), checkpoint_root=root / "ckpt")
        state = load_state(session.checkpoints[-1])
        mlflow.set_tracking_uri(uri)
        # ensure_experiment, not mlflow.set_experiment: the latter roots artifacts in the cwd.
        experiment_id = tracking_store.ensure_experiment(tracking_store.client(uri), "ldct/validate-test")
        run = tracking_store.client(uri).create_run(experiment_id)
        version = registry_versions.register_state(
            state, run.info.run_id, uri, tags={"study": "validate-test"}
        )
        yield uri, str(version.version)


def _tags(uri: str, version: str) -> dict[str, str]:
    return dict(tracking_store.client(uri).get_model_version(registry_versions.MODEL_NAME, version).tags)


def _aliases(uri: str) -> dict[str, str]:
    model = tracking_store.client(uri).get_registered_model(registry_versions.MODEL_NAME)
    return {alias: str(v) for alias, v in model.aliases.items()}


def test_validate_openvino_promotes_and_tags_the_path(registry, capsys):
    uri, version = registry
    args = ["--tracking-uri", uri, "validate", "--backend", "openvino", "--precision", "fp32"]
    code = best_main([*args, "--device", "cpu", "--min-fps", "0.01", "--repeats", "1", "--size", "256"])
    out = capsys.readouterr()
    assert code == 0, out
    assert "precision gate on test split" in out.out and "openvino fp32" in out.out
    assert _aliases(uri)["champion"] == version
    tags = _tags(uri, version)
    assert tags["fps_backend"] == "openvino" and tags["fps_precision"] == "fp32" and tags["fps_batch"] == "1"
    assert json.loads(tags["fps_libraries"])["openvino_version"]
    assert "threads" in tags["fps_device"] and tags["fps_size"] == "256"
    assert "at batch 4" in tags["fps_batched"] and float(tags["fps_latency_ms"]) > 0
    verdict = json.loads(tags["fps_gate"])
    assert verdict["passed"] and verdict["max_abs_hu"] <= 0.1 and abs(verdict["d_psnr_window_db"]) <= 0.02


def test_validate_refuses_a_path_the_gate_rejects(registry, capsys):
    uri, version = registry
    before = _aliases(uri)
    code = best_main(
        [
            "--tracking-uri", uri, "validate", "--backend", "onnxruntime", "--precision", "int8",
            "--device", "cpu", "--min-fps", "0.01", "--repeats", "1", "--size", "64",
            "--set", "deploy.gate_max_abs_hu=0.0",  # int8 is never bit-exact: refused
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "precision gate" in err and "max |diff|" in err
    assert _aliases(uri) == before
    assert "precision gate refused" in _tags(uri, version)["fps_last_failed"]


def test_validate_auto_chooses_the_fastest_gated_path(registry, capsys):
    uri, version = registry
    code = best_main(
        ["--tracking-uri", uri, "validate", "--backend", "auto", "--precision", "auto",
         "--device", "cpu", "--min-fps", "0.01", "--repeats", "2", "--size", "128"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    for path in ("torch fp32", "onnxruntime fp32", "onnxruntime int8", "openvino fp32", "openvino int8"):
        assert path in out
    tags = _tags(uri, version)
    chosen = f"{tags['fps_backend']} {tags['fps_precision']}"
    assert f"PASS: {chosen}" in out and json.loads(tags["fps_gate"])["passed"]


def test_validate_cuda_backend_here_is_a_clear_error(registry, capsys):
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.fail(
            "this test expects a CPU-only onnxruntime (CI); a GPU machine runs test_backends' CUDA branch"
        )
    uri, _ = registry
    before = _aliases(uri)
    code = best_main(["--tracking-uri", uri, "validate", "--backend", "tensorrt", "--repeats", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "TensorrtExecutionProvider" in err and "onnxruntime-gpu" in err
    assert _aliases(uri) == before


def test_validate_iq_guard_checks_detectability_before_timing(registry, capsys):
    uri, version = registry
    code = best_main(
        ["--tracking-uri", uri, "validate", "--backend", "torch", "--precision", "fp32", "--iq-guard", "quick",
         "--device", "cpu", "--min-fps", "0.01", "--repeats", "1", "--size", "64"]
    )  # fmt: skip
    out = capsys.readouterr().out
    # The smoke generator barely changes its input (2 iterations from a zero-initialised residual):
    # its AUC per insert is the input's, within the interval, so the guard lets it through.
    assert code == 0, out
    assert "image-quality guard (NPW AUC per insert, model vs LDCT input): passed" in out
    guard = json.loads(_tags(uri, version)["iq_guard"])
    assert guard["passed"] and set(guard["auc"]) == {"3mm/14HU", "5mm/7HU", "7mm/5HU", "10mm/3HU"}
    assert guard["realizations"] == 20 and guard["observer"] == "npw"
