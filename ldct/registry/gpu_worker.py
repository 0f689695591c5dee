"""Work that must run on a GPU worker of a Ray cluster while the driver stays on the head.

``ldct-best validate --on-cluster`` loads the model from MLflow on the head (the server listens on
the head's loopback only) and measures FPS in a ``num_gpus=1`` Ray task, so the figure that
gates `champion` comes from a T4 worker, not from the CPU head. Ray core only (a task), no Tune.
"""

from __future__ import annotations

import re
from typing import Any

from ldct.cluster import RemoteError, connect, root_cause
from ldct.deploy.validate import ValidationInputs, validate_paths, validation_inputs


def _validate_on_gpu(
    generator: Any, cfg: Any, paths: Any, repeats: int, size: int, inputs: ValidationInputs
) -> dict[str, Any]:
    return validate_paths(generator, cfg, paths, repeats=repeats, size=size, inputs=inputs)


def validate_on_gpu_worker(
    generator: Any,
    cfg: Any,
    paths: Any,
    repeats: int = 5,
    size: int = 512,
    timeout_s: float = 900.0,
    num_gpus: float = 1.0,
) -> dict[str, Any]:
    """:func:`ldct.deploy.validate.validate_paths` (gate + timing) in a Ray task that holds one GPU.

    The gate's test panel (and int8 calibration slices) are read here, on the head, and go to
    the task with it: the GPU worker needs no data cache (a worker's own ``$LDCT_HOME`` would
    be another, empty one). An autoscaling cluster may need minutes to start a GPU node, so the
    task waits up to ``timeout_s``; then it is cancelled and RemoteError names the cluster's
    GPUs. A task that fails raises RemoteError naming its node and the cause. ``num_gpus``: 1;
    0 only to run the task on a CPU-only Ray (tests).
    """
    import ray
    import ray.exceptions

    connect()
    inputs = validation_inputs(cfg, paths)
    task = ray.remote(num_gpus=num_gpus, max_retries=0)(_validate_on_gpu).remote(
        generator, cfg, paths, repeats, size, inputs
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
    try:
        return ray.get(task)
    except ray.exceptions.RayTaskError as exc:
        # The error ray.get raises is also an instance of the task's own exception class, whose
        # attributes shadow RayTaskError's (.ip raises AttributeError): read the node from the
        # message's first line, "ray::_validate_on_gpu() (pid=N, ip=A.B.C.D)".
        where = re.search(r"\(pid=(\d+), ip=([^)\s]+)\)", str(exc))
        node = f"node {where[2]} (pid {where[1]})" if where else "its node"
        raise RemoteError(
            f"the validation task failed on {node}: {root_cause(exc)}; its full traceback is above "
            "and in that node's /tmp/ray/session_latest/logs/worker-*"
        ) from exc
    except ray.exceptions.RayError as exc:
        # The node or its worker process died (OOM, a lost GPU node): no result, no traceback.
        raise RemoteError(
            f"the validation task did not finish: {root_cause(exc)}; `ray status` on the head "
            "shows whether its GPU node is still there"
        ) from exc
