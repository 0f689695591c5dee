"""The quality × throughput (Pareto) study: FPS per trial, ranks, registration against min_fps."""

from __future__ import annotations

import pytest

from ldct.config import load_config
from ldct.registry import versions as registry_versions
from ldct.study.pareto import pareto_ranks, register_candidate, select_candidate, write_front
from ldct.study.run import run_study
from ldct.study.space import apply_choice
from ldct.tracking import runs as tracking_runs
from ldct.tracking import store as tracking_store
from ldct.training.loop import VAL_METRIC


def test_pareto_ranks_and_selection():
    points = [(30.0, 1.0), (29.0, 5.0), (28.0, 4.0), (30.0, 0.5), (31.0, 0.2)]
    assert pareto_ranks(points) == [1, 1, 2, 2, 1]
    rows = [{VAL_METRIC: q, "fps": f} for q, f in points]
    assert select_candidate(rows, 0.9) is rows[0]  # best quality among those at >= 0.9 FPS
    assert select_candidate(rows, 4.5) is rows[1]
    assert select_candidate(rows, 6.0) is None
    # RED-CNN has no critic and no perceptual term: the trial trains (and logs) both weights at 0.
    assert apply_choice({}, "redcnn") == {
        "model.arch": "redcnn",
        "loss.lambda_adv": 0.0,
        "loss.lambda_perceptual": 0.0,
    }
    assert apply_choice({}, "resnet10t")["model.encoder"] == "resnet10t"


def _aliases(uri: str) -> dict[str, str]:
    model = tracking_store.client(uri).get_registered_model(registry_versions.MODEL_NAME)
    return {alias: str(v) for alias, v in model.aliases.items()}


@pytest.mark.slow
def test_smoke_pareto_study(tmp_path, ray_local):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        "smoke",
        [
            "study.name=par",
            "study.pareto=true",
            "study.arch_choices=resnet10t,redcnn",
            "study.extra_points=optim.lr=3e-4",
            "study.fps_repeats=1",
            "model.redcnn_channels=8",
            "study.min_fps=0",
        ],
    )
    result = run_study(cfg, tracking_uri=uri, storage=str(tmp_path / "runs"))
    mlflow_client = tracking_store.client(uri)
    runs = tracking_runs.trial_runs(mlflow_client, "par")
    assert len(runs) == 2
    for run in runs:
        assert run.data.metrics["fps"] > 0 and run.data.tags["ldct.fps_device"].startswith("cpu")
        assert run.data.metrics["pareto_rank"] >= 1 and "arch_choice" in run.data.params
        # The space set the chosen architecture in the trial's config: MLflow logs it per trial.
        assert (
            run.data.params["model.arch"] == "encoder_decoder"
            and run.data.params["model.encoder"] == "resnet10t"
        )
    assert result.registered_version is not None and result.pareto["rows"]

    fps = sorted(r.data.metrics["fps"] for r in runs)
    assert fps[0] < fps[1]
    faster = next(r for r in runs if r.data.metrics["fps"] == fps[1])
    # A bar between the two trials: only the faster one meets it, so it is the candidate.
    version, rows, message = register_candidate("par", uri, (fps[0] + fps[1]) / 2)
    assert version is not None and "registered version" in message
    tags = mlflow_client.get_model_version(registry_versions.MODEL_NAME, version).tags
    assert tags["trial_run_id"] == faster.info.run_id and float(tags["fps"]) >= (fps[0] + fps[1]) / 2
    assert _aliases(uri)["candidate"] == version
    # A bar no trial meets: nothing registered, and the study says so.
    before = _aliases(uri)
    none, _, message = register_candidate("par", uri, fps[1] * 10)
    assert none is None and message.startswith("no trial met min_fps")
    assert _aliases(uri) == before
    parent = tracking_runs.study_run(mlflow_client, "par")
    assert mlflow_client.get_run(parent.info.run_id).data.tags["ldct.pareto_decision"] == message
    out = write_front(rows, fps[1] * 10, message, tmp_path / "report")
    assert (out / "pareto.png").stat().st_size > 0 and message in (out / "pareto.md").read_text()
    assert f"| {VAL_METRIC} [dB] | val_psnr_window [dB] |" in (out / "pareto.md").read_text()
