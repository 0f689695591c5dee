"""Registering versions of ``ldct-denoiser``: from a study's best trial or any checkpoint state.

A version is logged as the safe format of :mod:`ldct.registry.model_format` (models-from-code
pyfunc, safetensors weights, this package as code) with tags that make ``ldct-best show`` and the
MLflow UI read as a comparison; the alias ``candidate`` points at a study's best trial.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ldct
from ldct.config import to_flat
from ldct.deploy.convert import export_onnx
from ldct.hyperparams import TUNED
from ldct.models import DEFAULT_ARCH
from ldct.registry import model_format
from ldct.tracking.runs import best_trial_run, download_state
from ldct.tracking.store import TAG_TRIAL, TrackingError, client
from ldct.training.checkpoint import generator_from_state

MODEL_NAME = "ldct-denoiser"
CANDIDATE = "candidate"
CHAMPION = "champion"


def register_best(
    study: str,
    tracking_uri: str | None = None,
    profile: str = "",
    parent_run_id: str | None = None,
    run: Any | None = None,
) -> Any:
    """Register the best trial of one study invocation (its parent run; default the latest), or
    ``run`` (one of its trial runs), as ``ldct-denoiser`` with alias ``candidate``; returns the
    version."""
    mlflow_client = client(tracking_uri)
    best = run if run is not None else best_trial_run(mlflow_client, study, parent_run_id)
    run_id = best.info.run_id
    state = download_state(mlflow_client, run_id)
    tags = {"study": study, "trial_id": best.data.tags.get(TAG_TRIAL, "")}
    if parent_run_id:
        tags["study_run_id"] = parent_run_id
    if profile:
        tags["profile"] = profile
    return register_state(state, run_id, tracking_uri, tags=tags)


def register_state(
    state: dict[str, Any],
    run_id: str,
    tracking_uri: str | None = None,
    tags: dict[str, str] | None = None,
    alias: str | None = CANDIDATE,
    onnx: bool | None = None,
) -> Any:
    """Log a checkpoint's generator as a model of ``run_id``, register it and point ``alias`` at it.

    The model is the safe format of ``ldct.registry.model_format`` (models-from-code pyfunc, safetensors weights,
    explicit [N, H, W] HU signature, this package as code_paths, the ONNX export as an artifact
    unless ``onnx`` is False; None: as the checkpoint's own ``study.register_onnx`` says).
    """
    import mlflow
    import mlflow.pyfunc

    mlflow_client = client(tracking_uri)
    generator, cfg = generator_from_state(state)
    if onnx is None:
        onnx = cfg.study.register_onnx
    metadata = {
        "ldct_format": model_format.MODEL_FORMAT,
        "normalization": state["normalization"],
        "config": state["config"],
        "metrics": {k: float(v) for k, v in state["metrics"].items() if isinstance(v, int | float)},
        "study": (tags or {}).get("study", ""),
        "trial_run_id": run_id,
        "perceptual_weights": state.get("perceptual_weights", ""),
        "input": "HU slices [N, H, W] float32, any H and W; output: denoised HU, same shape",
    }
    with tempfile.TemporaryDirectory(prefix="ldct-model-") as tmp:
        files = model_format.write_model_files(state, Path(tmp) / "files")
        artifacts = {"weights": str(files["weights"]), "spec": str(files["spec"])}
        onnx_error = ""
        if onnx:
            try:
                export_onnx(generator, Path(tmp) / "files" / model_format.ONNX_FILE)
                artifacts["onnx"] = str(Path(tmp) / "files" / model_format.ONNX_FILE)
            except Exception as exc:  # noqa: BLE001 - the pyfunc model is still worth registering
                onnx_error = f"{type(exc).__name__}: {exc}"[:500]
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(model_format.PYFUNC_SCRIPT),
                artifacts=artifacts,
                code_paths=[_package_copy(Path(tmp) / "code")],
                signature=model_format.signature(),
                metadata=metadata,
                pip_requirements=_requirements(),
            )
    version = mlflow.register_model(info.model_uri, MODEL_NAME)
    metrics = metadata["metrics"]
    all_tags = {
        "trial_run_id": run_id,
        "profile": cfg.profile,
        "arch": cfg.model.arch,
        "encoder": cfg.model.encoder,
        "format": model_format.MODEL_FORMAT,
        **{k: f"{v:.4f}" for k, v in metrics.items() if k.startswith("val_")},
        **({"onnx_error": onnx_error} if onnx_error else {}),
        **(tags or {}),
    }
    for key, value in all_tags.items():
        mlflow_client.set_model_version_tag(MODEL_NAME, version.version, key, str(value))
    mlflow_client.update_registered_model(MODEL_NAME, description=MODEL_DESCRIPTION)
    mlflow_client.update_model_version(
        MODEL_NAME,
        version.version,
        description=_version_description(cfg, metrics, all_tags, "onnx" in artifacts),
    )
    if alias:
        mlflow_client.set_registered_model_alias(MODEL_NAME, alias, version.version)
    return mlflow_client.get_model_version(MODEL_NAME, version.version)


MODEL_DESCRIPTION = (
    "Low-dose CT denoiser (EfficientNetV2-style encoder + decoder, WGAN-GP with L1 and perceptual "
    "losses), trained by the ldct study. Input and output are CT slices in Hounsfield units, "
    "float32 [N, H, W], any H and W; the HU window normalisation is inside the model. Aliases: "
    "`candidate` = best trial of the latest study, `champion` = passed `ldct-best validate` "
    "(FPS at 512x512). Serve: `mlflow models serve -m models:/ldct-denoiser@champion "
    "--env-manager local`; DICOM in/out: `ldct-best denoise`."
)


def _version_description(cfg: Any, metrics: dict[str, float], tags: dict[str, str], onnx: bool) -> str:
    flat = to_flat(cfg)
    tuned = ", ".join(f"{t.key.split('.')[-1]}={flat[t.key]:.3g}" for t in TUNED)
    parts = [
        f"study {tags.get('study') or '-'}, trial {tags.get('trial_id') or '-'} (run {tags['trial_run_id']})",
        f"profile {cfg.profile}, encoder {cfg.model.encoder}; {tuned}",
    ]
    # The body metrics lead (inside the body, anatomy window), the whole-slice window figures
    # after them (a version trained before the body metrics has only these).
    for kind in ("body", "window"):
        if f"val_psnr_{kind}" in metrics:
            parts.append(
                f"validation at step {int(metrics.get('step', 0))}: "
                f"PSNR({kind}) {metrics[f'val_psnr_{kind}']:.2f} dB"
                + (
                    f" vs LDCT input {metrics[f'val_ldct_psnr_{kind}']:.2f} dB"
                    if f"val_ldct_psnr_{kind}" in metrics
                    else ""
                )
                + (
                    f", SSIM({kind}) {metrics[f'val_ssim_{kind}']:.4f}"
                    if f"val_ssim_{kind}" in metrics
                    else ""
                )
            )
    parts.append(
        "files: weights.safetensors + ldct_model.json (safe to load), "
        + ("model.onnx (pad/crop inside, [N,1,H,W] in [0, 1]), " if onnx else "")
        + "pyfunc HU in / HU out"
    )
    return "\n".join(parts)


def _package_copy(target: Path) -> str:
    """This package without caches, for ``code_paths`` (the model then needs no ldct install)."""
    import shutil

    source = Path(ldct.__file__).resolve().parent
    shutil.copytree(source, target / "ldct", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(target / "ldct")


def _requirements() -> list[str]:
    # Given explicitly: MLflow's inference of requirements imports and profiles the model (slow).
    # Only PyPI packages: the ldct code travels in the model's code/ directory.
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "timm", "numpy", "safetensors")]


def resolve_version(mlflow_client: Any, alias: str | None = None, version: str | int | None = None) -> Any:
    """A registry version by number or alias, with an error that lists what exists."""
    from mlflow.exceptions import MlflowException

    try:
        if version is not None:
            return mlflow_client.get_model_version(MODEL_NAME, str(version))
        return mlflow_client.get_model_version_by_alias(MODEL_NAME, alias or CANDIDATE)
    except MlflowException as exc:
        try:
            known = ", ".join(
                f"v{row['version']}" + (f" ({','.join(row['aliases'])})" if row["aliases"] else "")
                for row in list_versions(mlflow_client.tracking_uri)
            )
        except MlflowException:
            known = ""
        what = f"version {version}" if version is not None else f"alias {alias or CANDIDATE!r}"
        raise TrackingError(
            f"model {MODEL_NAME!r} has no {what} in {mlflow_client.tracking_uri}; "
            f"registered: {known or 'none (run a study first)'}"
        ) from exc


def _model_label(tags: dict[str, str]) -> str:
    arch = tags.get("arch", DEFAULT_ARCH)
    return tags.get("encoder", "") if arch == DEFAULT_ARCH else arch


def list_versions(tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Registered versions, newest first, with aliases, validation metrics and FPS."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking_uri)
    try:
        versions = mlflow_client.search_model_versions(f"name = '{MODEL_NAME}'")
    except MlflowException:
        return []
    if not versions:
        # An empty store has no registered model to read aliases from (get_registered_model raises).
        return []
    # search_model_versions leaves `aliases` empty; the registered model holds the mapping.
    by_version: dict[str, list[str]] = {}
    for alias, number in mlflow_client.get_registered_model(MODEL_NAME).aliases.items():
        by_version.setdefault(str(number), []).append(alias)
    rows = []
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        rows.append(
            {
                "version": v.version,
                "aliases": sorted(by_version.get(str(v.version), [])),
                "study": v.tags.get("study", ""),
                "trial": v.tags.get("trial_id", ""),
                "encoder": v.tags.get("encoder", ""),
                # What the version is: its timm encoder, or its architecture where it has none
                # (a RED-CNN version carries model.encoder's unused default in its tags).
                "model": _model_label(v.tags),
                "val_psnr_body": v.tags.get("val_psnr_body", ""),
                "val_ssim_body": v.tags.get("val_ssim_body", ""),
                "val_psnr_window": v.tags.get("val_psnr_window", ""),
                "val_ssim_window": v.tags.get("val_ssim_window", ""),
                "fps": v.tags.get("fps", ""),
                "fps_device": v.tags.get("fps_device", ""),
                # Versions from before the safe format carry no tag: `ldct-best migrate` them.
                "format": v.tags.get("format", "old pickle (migrate)"),
                "run_id": v.run_id,
            }
        )
    return rows
