"""Work that must run on a GPU worker of a Ray cluster while the driver stays on the head.

``ldct-best validate --on-cluster`` loads the model from MLflow on the head (the server listens on
the head's loopback only) and measures FPS in a ``num_gpus=1`` Ray task, so the figure that
gates `champion` comes from a T4 worker, not from the CPU head.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class RemoteError(RuntimeError):
    """No cluster to join, or no GPU worker took the task in time; the message says what to do."""


def running_cluster() -> str | None:
    """Where ``ray.init()`` would join a running cluster (RAY_ADDRESS or a local `ray start`), else None."""
    if os.environ.get("RAY_ADDRESS"):
        return f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
    from ray._common.utils import get_ray_address_file

    address_file = Path(get_ray_address_file(None))
    if address_file.is_file() and address_file.read_text().strip():
        return f"{address_file} ({address_file.read_text().strip()})"
    return None


def connect() -> None:
    """Join the running cluster; never start a local Ray (it would have no GPU worker to wait for)."""
    import ray

    if ray.is_initialized():
        return
    where = running_cluster()
    if where is None:
        raise RemoteError(
            "--on-cluster needs a running Ray cluster, and none is running here (no RAY_ADDRESS, no "
            "`ray start` on this machine): run it on the head, e.g. `ray exec cluster/cluster.yaml "
            "'ldct-best validate --on-cluster'`, or drop --on-cluster to measure on this machine"
        )
    ray.init(log_to_driver=True)


def _validate_on_gpu(generator: Any, cfg: Any, paths: Any, repeats: int, size: int) -> dict[str, Any]:
    from ldct.deploy.validate import validate_paths

    return validate_paths(generator, cfg, paths, repeats=repeats, size=size)


def validate_on_gpu_worker(
    generator: Any,
    cfg: Any,
    paths: Any,
    repeats: int = 5,
    size: int = 512,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """:func:`ldct.deploy.validate.validate_paths` (gate + timing) in a Ray task that holds one GPU.

    The gate's test panel is read on the worker from the profile's data cache, so on a cluster
    that cache lives on shared storage (as the cluster configs say). An autoscaling cluster may
    need minutes to start a GPU node, so the task waits up to ``timeout_s``; then it is cancelled
    and RemoteError names the cluster's GPUs.
    """
    import ray

    connect()
    task = ray.remote(num_gpus=1, max_retries=0)(_validate_on_gpu).remote(
        generator, cfg, paths, repeats, size
    )
    ready, _ = ray.wait([task], timeout=timeout_s)
    if not ready:
        ray.cancel(task, force=True)
        gpus = ray.cluster_resources().get("GPU", 0)
        raise RemoteError(
            f"no GPU worker took the validation task within {timeout_s:g} s (the cluster has {gpus:g} "
            f"GPU(s) now): start GPU workers (worker_ips / gpu_worker in the cluster config) or raise "
            f"--gpu-timeout"
        )
    return ray.get(task)
