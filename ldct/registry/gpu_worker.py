"""Work that must run on a GPU worker of a Ray cluster while the driver stays on the head.

``ldct-best validate --on-cluster`` loads the model from MLflow on the head (the server listens on
the head's loopback only) and measures FPS in a ``num_gpus=1`` Ray task, so the figure that
gates `champion` comes from a T4 worker, not from the CPU head. Ray core only (a task), no Tune.
"""

from __future__ import annotations

from typing import Any

from ldct.cluster import RemoteError, connect
from ldct.deploy.validate import validate_paths


def _validate_on_gpu(generator: Any, cfg: Any, paths: Any, repeats: int, size: int) -> dict[str, Any]:
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
