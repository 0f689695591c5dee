"""The Tune/Train scaffolding every study-like run shares: the study, its seed repeats and Pareto.

Each of them resolves where its outputs go, opens its MLflow parent run, hands Tune the same
trial function with the same resources, the same MLflow callback and the same failure policy;
written once here so that they cannot drift apart (they did: the trials of a study on a cache
recorded ``data.source`` as the built-in set).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldct.cluster import check_job_outputs, check_shared_paths, init_ray, storage_uri
from ldct.config import Config, to_flat
from ldct.errors import TrainingError
from ldct.study.trial import run_trial
from ldct.tracking.callbacks import MLflowStudyCallback
from ldct.tracking.runs import data_source, start_study_run
from ldct.tracking.store import check_reachable, client, resolve_tracking_uri
from ldct.training.loop import prepare_data


@dataclass(frozen=True)
class Outputs:
    """Where a study writes: its MLflow store (absolute URI) and Ray storage (URI or absolute path)."""

    tracking_uri: str
    storage: str


@dataclass
class Opened:
    """A study's data, Ray and MLflow parent run, ready for its Tuner."""

    cache_dir: Path
    splits: dict[str, list[str]]
    mlflow_client: Any
    flat: dict[str, Any]
    parent_run_id: str


def resolve_outputs(cfg: Config, tracking_uri: str | None, storage: str | None) -> Outputs:
    """The store and storage of a run: flags > profile > defaults; checked before any work starts."""
    uri = resolve_tracking_uri(tracking_uri or cfg.study.tracking_uri or None)
    check_reachable(uri)
    # A URI stays as given, a local path becomes absolute (never pathlib on s3://).
    storage_path = storage_uri(storage or cfg.study.storage or None)
    check_job_outputs(storage_path, uri)
    return Outputs(uri, storage_path)


def open_study(cfg: Config, name: str, outputs: Outputs, resume: bool) -> Opened:
    """Data ready before any worker starts, Ray joined or started, the MLflow parent run opened."""
    cache_dir, splits = prepare_data(cfg)
    init_ray()
    check_head_hosts_trials(cfg)
    check_shared_paths({"storage": outputs.storage, "data.cache": str(cache_dir)})
    mlflow_client = client(outputs.tracking_uri)
    flat = to_flat(cfg)
    parent = start_study_run(mlflow_client, name, flat, resume)
    return Opened(cache_dir, splits, mlflow_client, flat, parent)


def study_callback(
    name: str, outputs: Outputs, opened: Opened, per_trial: Iterable[str] = (), checkpoint: str = "best"
) -> MLflowStudyCallback:
    """The MLflow writer of a study's trials; ``per_trial``: keys each trial logs from its own
    config; ``checkpoint``: which one each run keeps as its artifact ("best" or "last")."""
    skip = set(per_trial)
    return MLflowStudyCallback(
        outputs.tracking_uri,
        name,
        opened.parent_run_id,
        extra_params={
            **{k: v for k, v in opened.flat.items() if k not in skip},
            "data.source": data_source(opened.flat),
        },
        storage=outputs.storage,
        checkpoint=checkpoint,
    )


def trainable(cfg: Config, outputs: Outputs, opened: Opened, function: Any = run_trial) -> Any:
    """The trial function (``run_trial``, or a LOSO fold's) with its fixed arguments and resources."""
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(
            function,
            base=opened.flat,
            cache_dir=str(opened.cache_dir),
            splits=opened.splits,
            storage=outputs.storage,
        ),
        trial_resources(cfg),
    )


# Ray's resource that only the head node carries (ray._common.constants.HEAD_NODE_RESOURCE_NAME).
HEAD_NODE_RESOURCE = "node:__internal_head__"


def trial_resources(cfg: Config) -> dict[str, float]:
    """What a trial's function reserves: a few CPUs, on the head node.

    The function only waits on its trainer (the workers reserve their own CPUs/GPUs), but Train V2
    runs the trainer's controller where the function runs: a trial placed on a worker node dies
    with that node, and Train's retry from the last checkpoint never starts. On the head (a
    1/1000 share of its marker resource, so a thousand trials fit) a worker node's death only
    takes workers, which Train restarts.
    """
    return {"CPU": cfg.study.driver_cpus, HEAD_NODE_RESOURCE: 0.001}


def check_head_hosts_trials(cfg: Config) -> None:
    """Refuse, before any trial, a head that cannot take a trial's function (which
    :func:`trial_resources` places there): a head started with ``--num-cpus=0`` would leave every
    trial pending, silently, for ever."""
    import ray

    heads = [n for n in ray.nodes() if n["Alive"] and HEAD_NODE_RESOURCE in n["Resources"]]
    cpus = float(heads[0]["Resources"].get("CPU", 0.0)) if heads else 0.0
    if cpus < cfg.study.driver_cpus:
        raise TrainingError(
            f"the Ray head has {cpus:g} CPUs and every trial's function runs there, holding "
            f"study.driver_cpus = {cfg.study.driver_cpus:g}: start the head with CPUs (not "
            "--num-cpus=0), or lower study.driver_cpus"
        )


def run_config(name: str, outputs: Outputs, callback: Any) -> Any:
    """Tune's RunConfig: retries happen inside Ray Train (from the trial's last checkpoint); a
    trial that still fails is recorded as failed and the study goes on."""
    from ray import tune

    return tune.RunConfig(
        name=name,
        storage_path=outputs.storage,
        callbacks=[callback],
        failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        verbose=1,
    )
