"""Promotion: the validated path of a version and the move of alias ``champion``.

``ldct-best validate`` measures every candidate path (backend x precision) through the precision
gate and the batch-1 512x512 timing (``ldct.deploy.validate``); this module turns that report into
the decision and writes it to the registry: the alias and the ``fps_*`` tags on a pass, an
``fps_last_failed`` tag (aliases untouched) on a fail. The CLI only prints the message.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from ldct.deploy.backends import BACKENDS, candidate_paths
from ldct.deploy.throughput import default_min_fps
from ldct.errors import LdctError
from ldct.registry.versions import CHAMPION, MODEL_NAME
from ldct.tracking.store import client


class PromotionError(LdctError, ValueError):
    """A validation cannot be planned as asked (e.g. no FPS bar for the device); says what to give."""


@dataclass(frozen=True)
class ValidationPlan:
    """Where and how a version is validated: the device, the bar and the candidate paths."""

    device: str
    precision: str
    min_fps: float
    paths: list[tuple[str, str]]


@dataclass(frozen=True)
class Decision:
    """The outcome of one validation: promoted or not, and the line that says so."""

    promoted: bool
    message: str


def plan_validation(
    backend: str,
    precision: str | None,
    min_fps: float | None,
    device: str | None,
    on_cluster: bool,
    cuda_available: bool,
) -> ValidationPlan:
    """Resolve ``--backend/--precision/--min-fps/--device`` into the paths to measure.

    An impossible path (a backend that is not installed, a precision it lacks) fails here, before
    any model is loaded.
    """
    if on_cluster or (backend != "auto" and BACKENDS[backend].device_type == "cuda"):
        device = "cuda"
    else:
        device = device or ("cuda" if cuda_available else "cpu")
    if backend == "torch" and device == "cuda":
        backend = "torch-cuda"
    precision = precision or ("fp16" if device == "cuda" else "fp32")
    bar = min_fps if min_fps is not None else default_min_fps(device)
    if bar is None:
        raise PromotionError(
            f"give --min-fps for --device {device}: the paper's 12.5 FPS bar is a T4 (CUDA) figure"
        )
    return ValidationPlan(device, precision, bar, candidate_paths(backend, precision, device))


def decide(version: str, report: dict[str, Any], min_fps: float, tracking_uri: str | None = None) -> Decision:
    """Promote ``version`` if its fastest gated path meets ``min_fps``, else record why not."""
    chosen = report["chosen"]
    mlflow_client = client(tracking_uri)
    if chosen is None:
        refused = "; ".join(
            f"{r['backend']} {r['precision']}: {', '.join(r['gate']['failures'])}" for r in report["rows"]
        )
        mlflow_client.set_model_version_tag(
            MODEL_NAME, version, "fps_last_failed", f"precision gate refused {refused}"[:5000]
        )
        return Decision(False, f"FAIL: no path passed the precision gate ({refused}); aliases unchanged")
    result = chosen["throughput"]
    label = f"{result['backend']} {result['precision']}"
    if result["fps"] >= min_fps:
        promote(version, result, min_fps, tracking_uri)  # fps_size from result
        tag_path(mlflow_client, version, chosen)
        return Decision(
            True,
            f"PASS: {label} {result['fps']:.2f} FPS at batch 1 >= {min_fps:g} on {result['device_name']} "
            f"(batch {result['batched_batch']}: {result['batched_fps']:.2f} FPS); "
            f"alias 'champion' -> v{version}",
        )
    record_failed_validation(version, result, min_fps, tracking_uri)
    return Decision(
        False,
        f"FAIL: fastest gated path {label} {result['fps']:.2f} FPS at batch 1 < {min_fps:g} on "
        f"{result['device_name']} (batch {result['batched_batch']}: {result['batched_fps']:.2f} FPS); "
        "aliases unchanged",
    )


def tag_path(mlflow_client: Any, version: str, row: dict[str, Any]) -> None:
    """Beside :func:`promote`'s fps tags: backend, latency, batched figure and the gate's deltas."""
    result, verdict = row["throughput"], row["gate"]
    tags = {
        "fps_backend": result["backend"],
        "fps_latency_ms": f"{result['latency_ms']:.1f}",
        "fps_batched": f"{result['batched_fps']:.2f} at batch {result['batched_batch']}",
        "fps_gate": json.dumps({k: v for k, v in verdict.items() if k != "failures"}),
    }
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(MODEL_NAME, str(version), key, value)


def promote(
    version: str, throughput: dict[str, Any], min_fps: float, tracking_uri: str | None = None
) -> None:
    """Move alias ``champion`` to ``version`` and tag it with the measured throughput."""
    mlflow_client = client(tracking_uri)
    tags = {
        "fps": f"{throughput['fps']:.2f}",
        "fps_device": throughput.get("device_name", ""),
        "fps_device_type": throughput.get("device", ""),
        "fps_batch": str(throughput.get("batch", "")),
        "fps_precision": throughput.get("precision", ""),
        "fps_size": str(throughput.get("size", 512)),
        "fps_min_required": f"{min_fps:g}",
        "fps_libraries": json.dumps({k: v for k, v in throughput.items() if k.endswith("_version")}),
        "validated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(MODEL_NAME, str(version), key, str(value))
    mlflow_client.set_registered_model_alias(MODEL_NAME, CHAMPION, str(version))


def record_failed_validation(
    version: str, throughput: dict[str, Any], min_fps: float, tracking_uri: str | None = None
) -> None:
    """Note a failed throughput check on the version (aliases untouched)."""
    mlflow_client = client(tracking_uri)
    mlflow_client.set_model_version_tag(
        MODEL_NAME,
        str(version),
        "fps_last_failed",
        f"{throughput['fps']:.2f} < {min_fps:g} on {throughput.get('device_name', '?')}",
    )


def record_iq_guard(version: str, verdict: dict[str, Any], tracking_uri: str | None = None) -> None:
    """The image-quality guard's verdict on the version (tag ``iq_guard``; aliases untouched)."""
    summary = {
        "passed": verdict["passed"],
        "failed_inserts": verdict["failed_inserts"],
        **verdict["setup"],
        "auc": {m["insert"]: m["auc"] for m in verdict["rows"]["model"]},
        "auc_ldct": {m["insert"]: m["auc"] for m in verdict["rows"]["LDCT"]},
    }
    client(tracking_uri).set_model_version_tag(MODEL_NAME, str(version), "iq_guard", json.dumps(summary))
