"""Loading registered versions: only JSON, YAML and safetensors are read, nothing executed.

A version in the old pickle format (MLflow pytorch flavour) is refused with the command that
re-registers it from its trial's weights-only checkpoint (:func:`migrate`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ldct.deploy.export import normalization_from_meta
from ldct.evaluation.denoisers import Denoiser, checkpoint_denoiser, onnx_denoiser, torch_denoiser
from ldct.metrics import METRIC_NAMES
from ldct.registry import model_format
from ldct.registry.versions import MODEL_NAME, register_state, resolve_version
from ldct.tracking.runs import download_state
from ldct.tracking.store import TrackingError, client


def load_registered(
    alias: str | None = None, version: str | int | None = None, tracking_uri: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """Load a registered generator (any batch/image size, [N,1,H,W] in [0, 1]) and its metadata.

    Reads only the version's MLmodel (YAML), ldct_model.json and weights.safetensors: nothing
    from the store is unpickled or executed. A version in the old pickle format is refused with
    the command that re-registers it.
    """
    mlflow_client = client(tracking_uri)
    model_version = resolve_version(mlflow_client, alias, version)
    uri = f"models:/{MODEL_NAME}/{model_version.version}"
    with tempfile.TemporaryDirectory(prefix="ldct-load-") as tmp:
        model_meta = _registered_metadata(uri, str(model_version.version), Path(tmp))
        try:
            weights = _download(f"{uri}/artifacts/{model_format.WEIGHTS_FILE}", Path(tmp))
            spec = _download(f"{uri}/artifacts/{model_format.SPEC_FILE}", Path(tmp))
            generator, spec_data = model_format.read_model_files(weights, spec)
        except Exception as exc:  # noqa: BLE001 - missing file, bad safetensors, bad spec: one answer
            raise TrackingError(
                f"{uri}: its weights/spec are not the safe ldct format ({exc}). "
                f"{_reregister_hint(model_version.version)}"
            ) from exc
    meta = {
        "version": str(model_version.version),
        "run_id": model_version.run_id,
        "aliases": list(model_version.aliases),
        "tags": dict(model_version.tags),
        "normalization": spec_data["normalization"],
        "config": spec_data.get("config", {}),
        "metrics": _metric_rows(model_meta.get("metrics", {})),
        "study": model_meta.get("study", ""),
        "tracking_uri": mlflow_client.tracking_uri,
    }
    return generator, meta


def _download(artifact_uri: str, directory: Path) -> str:
    import mlflow.artifacts

    target = directory / artifact_uri.rsplit("/", 1)[-1].replace(".", "_")
    target.mkdir(parents=True, exist_ok=True)
    return mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(target))


def _reregister_hint(version: str | int) -> str:
    return (
        f"Re-register it in the safe format: `ldct-best migrate --model-version {version}` (reads the "
        f"trial's weights-only checkpoint and registers a new version with the same aliases), or "
        f"rerun the study."
    )


def _registered_metadata(uri: str, version: str | int, tmp: Path) -> dict[str, Any]:
    """The MLmodel metadata of a version (safe YAML); an old or foreign format raises TrackingError."""
    from mlflow.models import Model

    model = Model.load(_download(f"{uri}/MLmodel", tmp))
    meta = model.metadata or {}
    if meta.get("ldct_format") != model_format.MODEL_FORMAT:
        flavors = ", ".join(sorted(model.flavors))
        old = "pytorch" in model.flavors
        raise TrackingError(
            f"{uri} is "
            + (
                "in the old pickle format (MLflow pytorch flavour)"
                if old
                else f"not an ldct model ({flavors})"
            )
            + ": ldct refuses to load it, because unpickling a model can run arbitrary code. "
            + _reregister_hint(version)
        )
    return meta


def is_safe_version(mlflow_client: Any, version: str | int) -> bool:
    """True when a version is in the safe ldct format (what :func:`load_registered` accepts)."""
    with tempfile.TemporaryDirectory(prefix="ldct-check-") as tmp:
        try:
            _registered_metadata(f"models:/{MODEL_NAME}/{version}", version, Path(tmp))
        except TrackingError:
            return False
    return True


def migrate(version: str | int, tracking_uri: str | None = None) -> Any:
    """Re-register an old-format version from its trial run's (weights-only) checkpoint.

    The new version gets the old one's tags and aliases; the old one is tagged as superseded.
    Nothing of the old model is loaded.
    """
    mlflow_client = client(tracking_uri)
    old = resolve_version(mlflow_client, version=version)
    if is_safe_version(mlflow_client, old.version):
        raise TrackingError(f"version {old.version} of {MODEL_NAME!r} is already in the safe format")
    aliases = [
        a
        for a, v in mlflow_client.get_registered_model(MODEL_NAME).aliases.items()
        if str(v) == str(old.version)
    ]
    try:
        state = download_state(mlflow_client, old.run_id)
    except TrackingError as exc:
        raise TrackingError(f"version {old.version} cannot be re-registered: {exc}") from exc
    keep = {k: v for k, v in old.tags.items() if k not in ("format",) and not k.startswith("fps")}
    new = register_state(
        state, old.run_id, tracking_uri, tags={**keep, "migrated_from": str(old.version)}, alias=None
    )
    for alias in aliases:
        mlflow_client.set_registered_model_alias(MODEL_NAME, alias, new.version)
    mlflow_client.set_model_version_tag(MODEL_NAME, str(old.version), "superseded_by", str(new.version))
    return mlflow_client.get_model_version(MODEL_NAME, new.version)


def _metric_rows(flat: dict[str, float]) -> dict[str, Any]:
    """Flat ``val_*`` / ``val_ldct_*`` metrics of a checkpoint -> {"validation": {"ldct": .., "denoised": ..}}."""
    rows: dict[str, Any] = {
        "validation": {
            "ldct": {m: flat[f"val_ldct_{m}"] for m in METRIC_NAMES if f"val_ldct_{m}" in flat},
            "denoised": {m: flat[f"val_{m}"] for m in METRIC_NAMES if f"val_{m}" in flat},
        }
    }
    if "step" in flat:
        rows["step"] = int(flat["step"])
    return rows


def parse_model_uri(uri: str) -> tuple[str | None, str | None]:
    """``models:/ldct-denoiser@ALIAS`` or ``models:/ldct-denoiser/VERSION`` -> (alias, version)."""
    prefix = f"models:/{MODEL_NAME}"
    if uri.startswith(prefix + "@") and len(uri) > len(prefix) + 1:
        return uri[len(prefix) + 1 :], None
    if uri.startswith(prefix + "/") and uri[len(prefix) + 1 :].isdigit():
        return None, uri[len(prefix) + 1 :]
    raise ValueError(f"model URI {uri!r}: expected {prefix}@ALIAS (e.g. @champion) or {prefix}/VERSION")


def load_denoiser(
    *,
    model: str | None = None,
    version: str | None = None,
    checkpoint: str | Path | None = None,
    onnx: str | Path | None = None,
    tracking_uri: str | None = None,
) -> tuple[Denoiser, str]:
    """The model row's denoiser and label from exactly one source (registry, checkpoint or ONNX)."""
    given = [
        n
        for n, v in (("model", model), ("version", version), ("checkpoint", checkpoint), ("onnx", onnx))
        if v
    ]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one model source (--model, --version, --checkpoint, --onnx); got {given}"
        )
    if checkpoint:
        return checkpoint_denoiser(checkpoint)
    if onnx:
        return onnx_denoiser(onnx)
    alias, number = parse_model_uri(model) if model else (None, version)
    generator, meta = load_registered(alias=alias, version=number, tracking_uri=tracking_uri)
    label = f"model v{meta['version']}" + (f" @{alias}" if alias else "")
    return torch_denoiser(generator, normalization_from_meta(meta)), label
