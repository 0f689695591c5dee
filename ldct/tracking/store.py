"""The MLflow store: where it is, reaching it, experiments, tags, params, the UI link.

Every URI is made absolute here, because Ray trials run in their own working directories
(docs/DESIGN.md §5a).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ldct.errors import LdctError

TAG_STUDY = "ldct.study"
TAG_ROLE = "ldct.role"
TAG_TRIAL = "ldct.trial_id"
PARENT_TAG = "mlflow.parentRunId"
# A trial run's best validation objective: "best_" + ldct.training.loop.VAL_METRIC (spelt out so
# that this module stays free of torch; tests/test_tracking.py checks the two agree). Runs from
# before the body metrics carry only LEGACY_BEST_METRIC, which every trial still logs.
BEST_METRIC = "best_val_psnr_body"
LEGACY_BEST_METRIC = "best_val_psnr_window"
# MLflow 3's UI opens an experiment of this kind on its runs table, not on the GenAI overview.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


class TrackingError(LdctError, RuntimeError):
    """MLflow cannot be reached or holds nothing to act on; the message says what to do."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Explicit URI > MLFLOW_TRACKING_URI > an absolute SQLite file in the working directory.

    Absolute, because Ray trials run in their own working directories (docs/DESIGN.md §5a).
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with what to do, when an MLflow server URI does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(
            f"MLflow server {uri} is unreachable ({exc}). Start it (e.g. `mlflow server --host 127.0.0.1 "
            f"--port 5000 --backend-store-uri sqlite:///mlflow.db`), or pass --tracking-uri / unset "
            f"MLFLOW_TRACKING_URI to use a local SQLite store."
        ) from exc


def client(uri: str | None = None) -> Any:
    import mlflow
    from mlflow.tracking import MlflowClient

    resolved = resolve_tracking_uri(uri)
    check_reachable(resolved)
    mlflow.set_tracking_uri(resolved)
    return MlflowClient(tracking_uri=resolved)


def artifact_root(uri: str) -> str | None:
    """Default artifact root of a store: ``mlartifacts/`` beside a SQLite file, never the cwd.

    MLflow's own default for a SQLite store is ``./mlruns`` of whatever directory the process runs
    in (trials chdir, tests run from the repository). A server decides for itself (None).
    """
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


def ensure_experiment(mlflow_client: Any, name: str) -> str:
    """The id of experiment ``name``, created with its artifacts under :func:`artifact_root`."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = artifact_root(mlflow_client.tracking_uri)
    location = f"{root}/{name.replace('/', '_')}" if root else None
    return mlflow_client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)


def experiment_id_of(mlflow_client: Any, study: str) -> str:
    return ensure_experiment(mlflow_client, f"ldct/{study}")


def find_run(mlflow_client: Any, experiment_id: str, **tags: str) -> Any | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = mlflow_client.search_runs(
        [experiment_id], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"]
    )
    return runs[0] if runs else None


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:6000]


def ui_url(tracking_uri: str, experiment_id: str, base: str | None = None) -> str:
    """The MLflow UI page that shows a study's trials as a comparison.

    MLflow 3.17 opens an experiment on its GenAI overview unless the ``workflowType`` URL
    parameter (or the browser's remembered sidebar switch) says "machine_learning"; the
    experiment tag ``mlflow.experimentKind`` alone does not change that (checked in Chromium).
    The filter keeps the trial runs only, so they are listed flat (not collapsed under the
    parent), best validation PSNR first.
    """
    from urllib.parse import quote

    if base is None:
        base = tracking_uri if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    query = "&".join(
        [
            "workflowType=machine_learning",
            "searchFilter=" + quote(f"tags.`{TAG_ROLE}` = 'trial'"),
            "orderByKey=" + quote(f"metrics.`{BEST_METRIC}`"),
            "orderByAsc=false",
        ]
    )
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


# MLflow's compare view takes its run ids in the URL; a few hundred fit any browser's limit, and
# a study with more trials is compared on its best ones.
COMPARE_MAX_RUNS = 200


def compare_url(tracking_uri: str, experiment_id: str, run_ids: list[str], base: str | None = None) -> str:
    """MLflow's own comparison of the given runs (parallel coordinates, scatter, diff table).

    The route is the UI's ``#/compare-runs?runs=[...]&experiments=[...]``: both lists are JSON
    arrays of strings, URL-encoded.
    """
    from urllib.parse import quote

    if not run_ids:
        raise TrackingError(
            f"no runs to compare in experiment {experiment_id}: has the study finished a trial?"
        )
    if base is None:
        base = tracking_uri if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    runs = quote(json.dumps(list(run_ids[:COMPARE_MAX_RUNS]), separators=(",", ":")))
    experiments = quote(json.dumps([str(experiment_id)], separators=(",", ":")))
    return f"{base.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"


def trial_run_ids(mlflow_client: Any, experiment_id: str, parent_run_id: str) -> list[str]:
    """The trial runs of one study invocation (nested under ``parent_run_id``; a study name
    resubmitted keeps its earlier invocations' trials in the experiment), best validation
    objective first (runs without it last)."""
    runs = mlflow_client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_ROLE}` = 'trial' and tags.`{PARENT_TAG}` = '{parent_run_id}'",
        order_by=[f"metrics.`{BEST_METRIC}` DESC"],
        max_results=COMPARE_MAX_RUNS,
    )
    return [run.info.run_id for run in runs]


def describe_store(mlflow_client: Any, study: str) -> str:
    """Where a study's runs and artifacts are, and the UI links, for the study to print: the
    compare link covers the trials of its latest invocation."""
    uri = mlflow_client.tracking_uri
    experiment = mlflow_client.get_experiment_by_name(f"ldct/{study}")
    lines = [f"[ldct] MLflow store {uri}, artifacts {experiment.artifact_location}"]
    if not uri.startswith(("http://", "https://")):
        lines.append(f"[ldct] to see the trials: mlflow ui --backend-store-uri {uri}  then open")
    else:
        lines.append("[ldct] to see the trials open")
    lines.append(f"[ldct]   {ui_url(uri, experiment.experiment_id)}")
    parent = find_run(mlflow_client, experiment.experiment_id, **{TAG_STUDY: study, TAG_ROLE: "study"})
    run_ids = trial_run_ids(mlflow_client, experiment.experiment_id, parent.info.run_id) if parent else []
    if run_ids:
        lines.append(
            "[ldct] to compare them (parallel coordinates over the loss weights, lr and objectives):"
        )
        lines.append(f"[ldct]   {compare_url(uri, experiment.experiment_id, run_ids)}")
    return "\n".join(lines)


def log_params(mlflow_client: Any, run_id: str, params: dict[str, Any]) -> None:
    """All params in log_batch calls of 100 (MLflow's limit), not one round trip each."""
    from mlflow.entities import Param

    items = [Param(str(k), _param_value(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[start : start + 100])
