"""Nothing loaded runs code: crafted checkpoints and crafted registered models are refused by every
loader (--resume, report, registration, `ldct-best validate/export/denoise/migrate`), and the file
their unpickling would create never appears."""

from __future__ import annotations

import pickle
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch
from _registry import CreatesFile, check_trap_is_armed, register_smoke
from conftest import write_dicom

from ldct.cli import best_main
from ldct.config import load_config
from ldct.registry import load as registry_load
from ldct.registry import model_format
from ldct.registry import versions as registry_versions
from ldct.study.report import write_report
from ldct.tracking import store as tracking_store
from ldct.training.checkpoint import (
    CHECKPOINT_FILE,
    FORMAT,
    CheckpointError,
    generator_from_state,
    load_state,
    plain,
)
from ldct.training.loop import run_local


def _crafted_checkpoint(directory: Path, marker: Path) -> Path:
    """A state.pt that looks like an ldct checkpoint but creates ``marker`` when unpickled."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"format": FORMAT, "step": 2, "generator": {}, "trap": CreatesFile(marker)},
        directory / CHECKPOINT_FILE,
    )
    return directory


def test_checkpoint_is_plain_data_with_rng_and_stream(tmp_path):
    session = run_local(load_config("smoke", ["train.iterations=2"]), checkpoint_root=tmp_path)
    file = session.checkpoints[-1] / CHECKPOINT_FILE
    # The project's own reader and torch's strict one agree: plain data only.
    state = torch.load(file, map_location="cpu", weights_only=True)
    assert state["format"] == FORMAT == load_state(file)["format"]
    assert state["rng"]["torch"].dtype == torch.uint8
    assert state["data_stream"] == {
        "batches_consumed": state["batches_consumed"],
        "seed": 0,
        "global_batch": 4,
    }
    assert state["batches_consumed"] > 0
    generator, cfg = generator_from_state(state)
    assert cfg.model.encoder == "resnet10t" and not generator.training


def test_plain_refuses_objects_before_saving():
    assert plain({"a": [1, (2.0, "x")], "t": torch.ones(1)})["a"] == [1, (2.0, "x")]
    with pytest.raises(TypeError, match=r"state.metrics.bad is a pathlib"):
        plain({"metrics": {"bad": Path("/x")}})


def test_crafted_checkpoint_is_refused_by_every_checkpoint_loader(tmp_path):
    marker = tmp_path / "pwned"
    check_trap_is_armed(marker)
    crafted = _crafted_checkpoint(tmp_path / "crafted", marker)

    with pytest.raises(CheckpointError, match=r"refused to load .*state.pt.*weights_only=True"):
        load_state(crafted)
    # --resume (the local session; Ray sessions go through the same load_state).
    with pytest.raises(CheckpointError, match="refused"):
        run_local(
            load_config("smoke", ["train.iterations=2"]), checkpoint_root=tmp_path / "r", resume_from=crafted
        )

    # The same file as a trial's artifact in MLflow: registration and `ldct report` refuse it.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_client = tracking_store.client(uri)
    experiment = tracking_store.ensure_experiment(mlflow_client, "ldct/crafted")
    # A study invocation (parent run) with one completed trial nested under it, as a study writes.
    parent = mlflow_client.create_run(
        experiment, tags={tracking_store.TAG_STUDY: "crafted", tracking_store.TAG_ROLE: "study"}
    )
    run = mlflow_client.create_run(
        experiment,
        tags={
            tracking_store.TAG_STUDY: "crafted",
            tracking_store.TAG_ROLE: "trial",
            tracking_store.TAG_TRIAL: "t1",
            tracking_store.PARENT_TAG: parent.info.run_id,
            "ldct.status": "completed",
        },
    )
    mlflow_client.log_metric(run.info.run_id, "best_val_psnr_window", 30.0)
    mlflow_client.log_artifacts(run.info.run_id, str(crafted), artifact_path="checkpoint")
    with pytest.raises(CheckpointError, match="refused"):
        registry_versions.register_best("crafted", uri)
    with pytest.raises(CheckpointError, match="refused"):
        write_report("crafted", tracking_uri=uri, results_root=tmp_path / "results", cfg=load_config("smoke"))
    # An old-format registered version whose run holds the crafted checkpoint: migrate refuses too.
    _log_pickled_model(uri, run.info.run_id, tmp_path / "unused-marker")
    assert best_main(["--tracking-uri", uri, "migrate", "--model-version", "1"]) == 1
    assert not marker.exists()


def _log_pickled_model(uri: str, run_id: str, marker: Path) -> str:
    """Register a model in MLflow's old pickle flavour whose unpickling creates ``marker``."""
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    net.trap = CreatesFile(marker)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            net, name="model", serialization_format="pickle", pip_requirements=["torch"]
        )
    return str(mlflow.register_model(info.model_uri, registry_versions.MODEL_NAME).version)


@pytest.fixture(scope="module")
def crafted_registry(tmp_path_factory):
    """v1: a safe model whose files were then replaced by an attacker (weights.safetensors -> a
    pickle, ldct_pyfunc.py -> code); v2: the old pickle flavour. Both would create the marker."""
    root = tmp_path_factory.mktemp("crafted-registry")
    marker = root / "pwned"
    uri, version, state = register_smoke(root)
    mlflow_client = tracking_store.client(uri)
    stored = next((root / "mlartifacts").rglob(model_format.WEIGHTS_FILE)).parents[1]
    (stored / "artifacts" / model_format.WEIGHTS_FILE).write_bytes(pickle.dumps(CreatesFile(marker)))
    (stored / "ldct_pyfunc.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    trial_run = mlflow_client.create_run(tracking_store.ensure_experiment(mlflow_client, "ldct/cli-test"))
    old = _log_pickled_model(uri, trial_run.info.run_id, marker)
    mlflow_client.set_registered_model_alias(registry_versions.MODEL_NAME, "tampered", version)
    mlflow_client.set_registered_model_alias(registry_versions.MODEL_NAME, "old", old)
    return uri, marker, trial_run.info.run_id, state, root


@pytest.mark.parametrize("alias", ["tampered", "old"])
def test_crafted_registered_model_is_refused_by_every_loader(crafted_registry, alias, tmp_path, capsys):
    uri, marker, _, _, _ = crafted_registry
    check_trap_is_armed(marker)
    series = tmp_path / "series"
    write_dicom(series / "0.dcm")
    commands = [
        ["validate", "--alias", alias, "--device", "cpu", "--min-fps", "0.01", "--repeats", "1"],
        ["export", "--alias", alias, "--out", str(tmp_path / "export")],
        ["denoise", str(series), str(tmp_path / "denoised"), "--alias", alias],
    ]
    for command in commands:
        assert best_main(["--tracking-uri", uri, *command]) == 1, command
        err = capsys.readouterr().err
        assert "ldct-best migrate" in err, (command, err)
        assert ("old pickle format" in err) == (alias == "old")
    with pytest.raises(tracking_store.TrackingError):
        registry_load.load_registered(alias=alias, tracking_uri=uri)
    assert not marker.exists()
    assert not (tmp_path / "export").exists() and not (tmp_path / "denoised").exists()


def test_migrate_reregisters_an_old_version_from_its_checkpoint(crafted_registry, capsys):
    uri, marker, run_id, state, root = crafted_registry
    mlflow_client = tracking_store.client(uri)
    # Give the old version's run the real (weights-only) checkpoint it was registered from.
    directory = root / "real-ckpt"
    directory.mkdir()
    torch.save(state, directory / CHECKPOINT_FILE)
    mlflow_client.log_artifacts(run_id, str(directory), artifact_path="checkpoint")
    old = mlflow_client.get_model_version_by_alias(registry_versions.MODEL_NAME, "old").version
    assert best_main(["--tracking-uri", uri, "show"]) == 0
    assert "old pickle (migrate)" in capsys.readouterr().out
    assert best_main(["--tracking-uri", uri, "migrate", "--model-version", str(old)]) == 0
    assert "aliases moved: old" in capsys.readouterr().out
    generator, meta = registry_load.load_registered(alias="old", tracking_uri=uri)
    assert int(meta["version"]) > int(old)
    assert (
        mlflow_client.get_model_version(registry_versions.MODEL_NAME, old).tags["superseded_by"]
        == meta["version"]
    )
    with torch.no_grad():
        assert generator(torch.full((1, 1, 40, 36), 0.25)).shape == (1, 1, 40, 36)
    assert not marker.exists()
