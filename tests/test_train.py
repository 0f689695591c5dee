"""Training loop: exact resume, NaN stop, 2-worker DDP under Ray Train, `ldct train` end to end."""

from __future__ import annotations

import math
import socket

import pytest
import ray.util
import torch

from ldct.config import ConfigError, load_config
from ldct.data.manifest import CacheNotFound
from ldct.errors import TrainingError
from ldct.training.checkpoint import load_state
from ldct.training.loop import prepare_data, run_local
from ldct.training.ray_train import build_trainer, check_cache_visible


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
    # The retry is visible in what the run reports (and so in MLflow).
    assert [r["resumed_from_step"] for r in straight.reports] == [0, 0]
    assert resumed.reports[0]["resumed_from_step"] == 2
    a, b = straight.reports[-1], resumed.reports[0]
    for key in (
        "train_loss_g",
        "train_loss_critic",
        "train_l1",
        "val_psnr_body",
        "val_psnr_window",
        "val_ssim_full",
    ):
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
    assert session.reports[-1]["perceptual_random"] == 1.0
    # The generator's and critic's input standardisation travel with their weights.
    assert float(state["generator"]["standardize.center"]) == 0.25
    assert float(state["critic"]["standardize.scale"]) == pytest.approx(0.05)


def test_sync_bn_choice():
    from ldct.training.ddp import sync_bn_enabled

    auto = _smoke()
    assert sync_bn_enabled(auto, 2, torch.device("cuda", 0))
    assert not sync_bn_enabled(auto, 1, torch.device("cuda", 0))
    assert not sync_bn_enabled(auto, 2, torch.device("cpu"))
    assert not sync_bn_enabled(_smoke("train.sync_bn=off"), 2, torch.device("cuda", 0))
    assert load_config("paper").train.sync_bn == "auto"
    with pytest.raises(TrainingError, match="needs CUDA"):
        sync_bn_enabled(_smoke("train.sync_bn=on"), 2, torch.device("cpu"))
    # An unknown mode is refused where the config is made, not later inside a Ray worker.
    with pytest.raises(ConfigError, match=r"train.sync_bn: 'yes' is not one of 'auto', 'on', 'off'"):
        _smoke("train.sync_bn=yes")


def test_sync_bn_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="sync_bn=on needs CUDA"):
        run_local(_smoke("train.sync_bn=on", "train.iterations=1"), checkpoint_root=tmp_path)


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    cfg = _smoke("train.iterations=4", "train.debug_nan_step=3")
    with pytest.raises(TrainingError, match=r"step 3") as info:
        run_local(cfg, checkpoint_root=tmp_path)
    assert "loss_g" in str(info.value)


@pytest.mark.slow
def test_two_worker_ddp_keeps_ranks_identical_and_a_nan_on_rank_1_stops_both(tmp_path, ray_local):
    """One 2-worker DDP run, so that Ray Train's start-up is paid once: its step-2 checkpoint
    holds identical ranks (the weights all-gathered at validation differ by exactly 0), then a NaN
    made on rank 1 at step 3 stops both workers with the step, the loss and the rank named."""
    import time

    cfg = _smoke(
        "train.workers=2",
        "train.cpus_per_worker=0.5",
        "train.iterations=4",
        "train.val_every=2",
        "train.debug_nan_step=3",
        "train.debug_nan_rank=1",
        "study.max_failures=0",
    )
    cache_dir, splits = prepare_data(cfg)
    trainer = build_trainer(cfg, name="ddp-nan", storage_path=tmp_path, cache_dir=cache_dir, splits=splits)
    started = time.perf_counter()
    try:
        result = trainer.fit()
        error = result.error
    except Exception as exc:  # noqa: BLE001 - Train V2 raises, older versions return the error
        error = exc
    seconds = time.perf_counter() - started
    (checkpoint,) = {p.parent for p in (tmp_path / "ddp-nan").rglob("state.pt")}
    state = load_state(checkpoint)
    assert state["step"] == 2
    assert state["metrics"]["weights_spread"] == 0.0
    assert math.isfinite(state["metrics"]["val_psnr_window"]) and math.isfinite(
        state["metrics"]["val_psnr_body"]
    )
    assert error is not None
    failures = getattr(error, "worker_failures", None) or getattr(error.__cause__, "worker_failures", {})
    # Both ranks raised the same error at the same step (rank 0 did not wait in an all-reduce
    # until Ray killed it or gloo timed out), naming the step, the loss and the rank that saw it.
    assert set(failures) == {0, 1}, error
    for rank, exc in failures.items():
        text = str(exc)
        assert "at step 3" in text and "loss_g" in text and "on rank 1" in text, (rank, text)
        assert f"worker rank {rank}" in text
    assert seconds < 180, seconds  # start-up (~30-60 s here) plus seconds, not a timeout


@pytest.mark.slow
@pytest.mark.aftersuite
def test_elastic_ddp_starts_with_the_workers_that_fit(tmp_path, ray_local):
    """train.min_workers (Ray Train V2's elastic num_workers): 4 workers of 0.6 CPU never fit on
    this 2-CPU Ray, so a fixed group would wait until its start timeout; elastic, the run starts
    once at least 2 fit, with those that do (2 or 3: Train counts what its coordinator reserves),
    and trains them on a batch of 5 that splits unevenly (3/2 or 2/2/1, engine.rank_share) into
    one model on every rank. Runs after the suite (scripts/test.sh): on the suite's shared Ray,
    right after other runs, Train's elastic policy waited up to ~100 s for free CPUs."""
    cfg = _smoke(
        "train.workers=4",
        "train.min_workers=2",
        "train.cpus_per_worker=0.6",
        "train.batch_size=5",
        "train.iterations=2",
        "train.val_every=2",
    )
    assert cfg.train.worker_range() == (2, 4)
    cache_dir, splits = prepare_data(cfg)
    trainer = build_trainer(cfg, name="elastic", storage_path=tmp_path, cache_dir=cache_dir, splits=splits)
    result = trainer.fit()
    assert result.error is None, result.error
    (checkpoint,) = {p.parent for p in (tmp_path / "elastic").rglob("state.pt")}
    state = load_state(checkpoint)
    assert state["step"] == 2 and state["metrics"]["world_size"] in (2, 3), state["metrics"]
    assert state["metrics"]["weights_spread"] == 0.0


def test_a_worker_that_cannot_see_the_cache_names_its_node_and_the_fix(tmp_path):
    # On another host the driver's cache path is another disk: the worker says so, not "build it".
    with pytest.raises(CacheNotFound) as caught:
        check_cache_visible(tmp_path / "head-only-cache")
    message = str(caught.value)
    assert str(tmp_path / "head-only-cache" / "manifest.json") in message
    assert ray.util.get_node_ip_address() in message and socket.gethostname() in message
    assert "--set data.cache=" in message and "ldct data index" not in message
    (tmp_path / "head-only-cache").mkdir()
    (tmp_path / "head-only-cache" / "manifest.json").write_text("{}")
    check_cache_visible(tmp_path / "head-only-cache")  # seen: the loader reads (and checks) it
