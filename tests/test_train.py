"""Training loop: exact resume, NaN stop, 2-worker DDP under Ray Train, `ldct train` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ldct.config import load_config
from ldct.train import TrainingError, build_trainer, load_state, prepare_data, run_local


def _smoke(*overrides: str):
    return load_config("smoke", list(overrides))


def test_resume_is_exact(tmp_path):
    cfg = _smoke("train.iterations=4", "train.val_every=2")
    straight = run_local(cfg, checkpoint_root=tmp_path / "a")
    assert [r["step"] for r in straight.reports] == [2, 4]
    halfway = straight.checkpoints[0]
    assert load_state(halfway)["step"] == 2

    resumed = run_local(cfg, checkpoint_root=tmp_path / "b", resume_from=halfway)
    assert [r["step"] for r in resumed.reports] == [4]
    a, b = straight.reports[-1], resumed.reports[0]
    for key in ("train_loss_g", "train_loss_critic", "train_l1", "val_psnr_window", "val_ssim_full"):
        assert a[key] == b[key], key  # bit-identical on CPU, not merely close
    final_a, final_b = load_state(straight.checkpoints[-1]), load_state(resumed.checkpoints[-1])
    for name, tensor in final_a["generator"].items():
        assert torch.equal(tensor, final_b["generator"][name]), name
    for name, tensor in final_a["critic"].items():
        assert torch.equal(tensor, final_b["critic"][name]), name


def test_checkpoint_is_self_describing(tmp_path):
    session = run_local(_smoke("train.iterations=2"), checkpoint_root=tmp_path)
    state = load_state(session.checkpoints[-1])
    assert state["config"]["model.encoder"] == "resnet10t"
    assert state["normalization"] == {"hu_min": -1024.0, "hu_max": 3072.0}
    assert {"generator", "critic", "opt_g", "opt_c", "step", "batches_consumed"} <= set(state)
    assert (session.checkpoints[-1] / "panel.png").stat().st_size > 1000
    assert state["perceptual_weights"].startswith("random")


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    cfg = _smoke("train.iterations=4", "train.debug_nan_step=3")
    with pytest.raises(TrainingError, match=r"step 3") as info:
        run_local(cfg, checkpoint_root=tmp_path)
    assert "loss_g" in str(info.value)


@pytest.mark.slow
def test_two_worker_ddp_keeps_ranks_identical(tmp_path, ray_local):
    cfg = _smoke("train.workers=2", "train.cpus_per_worker=0.5", "train.iterations=2", "train.val_every=2")
    cache_dir, splits = prepare_data(cfg)
    result = build_trainer(cfg, name="ddp", storage_path=tmp_path, cache_dir=cache_dir, splits=splits).fit()
    assert result.error is None
    assert result.metrics["step"] == 2
    assert result.metrics["weights_spread"] == 0.0
    assert math.isfinite(result.metrics["val_psnr_window"])
    with result.checkpoint.as_directory() as directory:
        assert load_state(directory)["step"] == 2


@pytest.mark.slow
def test_ldct_train_cli_smoke_json(tmp_path, capsys, ray_local, monkeypatch):
    from ldct.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--profile", "smoke", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    table = json.loads(last)
    assert set(table) == {"ldct", "classical", "bm3d", "denoised"}
    for row in table.values():
        assert {"psnr_window", "ssim_window", "psnr_full", "ssim_full", "rmse_hu"} <= set(row)
        assert all(math.isfinite(v) for v in row.values())
