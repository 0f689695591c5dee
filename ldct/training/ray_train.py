"""The one module of ``ldct.training`` that imports Ray: the loop on N Ray Train workers.

:class:`RaySession` gives the loop DDP (``prepare_model``), the world rank/size and
report/checkpoint through ``ray.train``; :func:`build_trainer` makes the ``TorchTrainer`` for one
run (gloo on CPU, NCCL on GPU), which ``ldct train`` fits directly and every study trial fits
inside its Tune function (``ldct.study.trial``).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from ldct.cluster import SHARED_FIX, cpu_thread_env, init_ray, storage_uri
from ldct.config import Config
from ldct.data.manifest import MANIFEST, CacheNotFound
from ldct.training.checkpoint import load_state
from ldct.training.loop import VAL_METRIC, loop_config_for, prepare_data, train_loop


class RaySession:
    """Inside a Ray Train worker: DDP via prepare_model, report/checkpoint via ray.train."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.world_rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        # Every parameter takes part in every loss (no unused-parameter search needed).
        return ray.train.torch.prepare_model(
            module, parallel_strategy_kwargs={"find_unused_parameters": False}
        )

    def load_state(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return load_state(Path(directory))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


def ray_train_loop(loop_config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs: the loop in this worker's Ray session."""
    check_cache_visible(Path(loop_config["cache_dir"]))
    train_loop(loop_config, RaySession())


def check_cache_visible(cache_dir: Path) -> None:
    """The data cache the driver prepared must be readable on this worker's node.

    The driver builds (or finds) the cache on its own node; on a worker of another host the same
    path is another disk. Without this check the loader's message, "no cache manifest; build it
    with ldct data index", sends the user to rebuild a cache that exists, on the wrong machine.
    """
    import ray.util

    if not (cache_dir / MANIFEST).is_file():
        raise CacheNotFound(
            f"{cache_dir / MANIFEST}: the data cache the study prepared on its driver's node is not "
            f"visible on node {ray.util.get_node_ip_address()} ({socket.gethostname()}): every node "
            f"must see it at the same path: {SHARED_FIX['data.cache']}"
        )


def build_trainer(
    cfg: Config,
    *,
    name: str,
    storage_path: str | os.PathLike[str],
    cache_dir: Path,
    splits: dict[str, list[str]],
    callbacks: list[Any] | None = None,
) -> Any:
    """A Ray Train TorchTrainer for one run (N workers, DDP; gloo on CPU, NCCL on GPU)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_path = storage_uri(storage_path)
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        ray_train_loop,
        train_loop_config=loop_config_for(cfg, cache_dir, splits),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.worker_range(), use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks or None,
            # Worker deaths are retried from the latest checkpoint; a controller that cannot place
            # its workers fails fast instead of waiting forever (2-CPU deadlock, docs/DESIGN.md §5a).
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.study.max_failures, controller_failure_limit=3
            ),
            worker_runtime_env={"env_vars": cpu_thread_env()},
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=VAL_METRIC, checkpoint_score_order="max"
            ),
        ),
    )


def run_with_ray(
    cfg: Config,
    storage_path: str | os.PathLike[str],
    name: str | None = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """One Ray Train run (``ldct train``): returns the Ray Result (best checkpoint, metrics)."""
    cache_dir, splits = prepare_data(cfg)
    init_ray()
    trainer = build_trainer(
        cfg,
        name=name or f"train-{cfg.profile}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=storage_path,
        cache_dir=cache_dir,
        splits=splits,
        callbacks=callbacks,
    )
    return fit(trainer)


def fit(trainer: Any) -> Any:
    """``trainer.fit()``, raising the lowest rank's own exception when workers failed.

    Train V2 wraps worker failures in a ``WorkerGroupError`` whose text keeps only the first and
    last 500 characters of each worker's traceback, so the line that names the failed loss and
    step can be cut in the middle (it was, once a module path grew by 12 characters). Its
    ``worker_failures`` hold the workers' exceptions intact: re-raise the first one, chained.
    """
    import ray.train

    try:
        return trainer.fit()
    except ray.train.WorkerGroupError as exc:
        failures = getattr(exc, "worker_failures", None) or {}
        if not failures:
            raise
        raise failures[min(failures)] from exc
