"""ONNX + TorchScript + OpenVINO export bundle of a generator, its parity check, and its loader.

Layout of an export directory (docs/DESIGN.md §5)::

    model.onnx        dynamic batch/height/width, float32 [N,1,H,W] in [0,1] -> same
    model.pt          TorchScript (torch.jit.load; needs neither ldct nor timm)
    model.xml/.bin    OpenVINO IR converted from model.onnx (dynamic N/H/W, fp32 weights)
    model_card.json   where the model came from, what it scored, how to feed it

The files are made by :mod:`ldct.deploy.convert` (which explains why the export is split into a
core and a pad/crop wrapper) and loaded by the :mod:`ldct.deploy.backends` runners.

All three are checked against eager PyTorch on a real CT slice (pydicom's CT_small by
default) and on batches of other sizes; more than 1 HU after de-normalisation raises
:class:`ExportParityError` and nothing is written.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import ldct
from ldct.config import HUNormalization
from ldct.deploy.backends import runner_from_export
from ldct.deploy.capabilities import library_versions
from ldct.deploy.convert import (
    INPUT_NAME,
    ONNX_FILE,
    OPENVINO_FILE,
    OPENVINO_WEIGHTS,
    OUTPUT_NAME,
    TORCHSCRIPT_FILE,
    ExportError,
    export_onnx,
    onnx_model,
    onnx_opset,
    onnx_to_openvino,
    prepare_export,
    torchscript_model,
)
from ldct.errors import LdctError

__all__ = [
    "BACKENDS",
    "CARD_FILE",
    "CARD_FORMAT",
    "EXPORT_BACKENDS",
    "INPUT_NAME",
    "ONNX_FILE",
    "OPENVINO_FILE",
    "OPENVINO_WEIGHTS",
    "OUTPUT_NAME",
    "PARITY_TOLERANCE_HU",
    "TORCHSCRIPT_FILE",
    "ExportError",
    "ExportParityError",
    "ExportedModel",
    "export_bundle",
    "export_onnx",
    "load_exported",
    "normalization_from_meta",
    "reference_slice",
]

CARD_FILE = "model_card.json"
CARD_FORMAT = 1
PARITY_TOLERANCE_HU = 1.0
EXPORT_BACKENDS = ("onnxruntime", "torch", "openvino")  # the CPU runners an export directory feeds
# The old name; not ldct.deploy.backends.BACKENDS (every registered runner).
BACKENDS = EXPORT_BACKENDS


class ExportParityError(LdctError, RuntimeError):
    """An exported file disagrees with eager PyTorch by more than the tolerance (in HU)."""


# --------------------------------------------------------------------------------------------
# Normalisation and the reference slice


def normalization_from_meta(meta: dict[str, Any]) -> HUNormalization:
    """The HU window a bundle's meta (or a model card) carries; missing is an error, never a default."""
    norm = meta.get("normalization")
    if isinstance(norm, dict) and "hu_min" in norm and "hu_max" in norm:
        return HUNormalization(hu_min=float(norm["hu_min"]), hu_max=float(norm["hu_max"]))
    config = meta.get("config") or {}
    if "normalization.hu_min" in config and "normalization.hu_max" in config:
        return HUNormalization(float(config["normalization.hu_min"]), float(config["normalization.hu_max"]))
    raise ValueError(
        "the model's meta has no HU normalisation ('normalization': {'hu_min', 'hu_max'} or "
        "config keys normalization.hu_min/hu_max); it must travel with the model, it is not guessed"
    )


def reference_slice() -> tuple[np.ndarray, str]:
    """pydicom's bundled CT_small.dcm in HU (float32 [128,128]) and its description."""
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    if path is None:
        raise FileNotFoundError("pydicom's test file CT_small.dcm is not available; pass reference_slice_hu")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return hu, "pydicom CT_small.dcm"


def _reference(reference_slice_hu: np.ndarray | None) -> tuple[np.ndarray, str]:
    if reference_slice_hu is None:
        ref_hu, ref_name = reference_slice()
    else:
        ref_hu, ref_name = np.asarray(reference_slice_hu, dtype=np.float32), "given slice"
    if ref_hu.ndim != 2:
        raise ValueError(f"reference_slice_hu must be a 2-D HU image, got shape {ref_hu.shape}")
    return ref_hu, ref_name


# --------------------------------------------------------------------------------------------
# Loading an export directory


class ExportedModel:
    """A loaded export directory: ``model(unit [N,1,H,W] float32) -> np.ndarray`` plus ``card``.

    The inference itself is a :mod:`ldct.deploy.backends` runner (``backend`` at ``precision``).
    """

    def __init__(
        self,
        model_dir: str | Path,
        backend: str = "onnxruntime",
        threads: int | None = None,
        precision: str = "fp32",
    ) -> None:
        if backend not in EXPORT_BACKENDS:
            raise ValueError(f"backend must be one of {EXPORT_BACKENDS}, got {backend!r}")
        self.model_dir = Path(model_dir)
        card_path = self.model_dir / CARD_FILE
        if not card_path.is_file():
            raise FileNotFoundError(
                f"{card_path} not found: {model_dir} is not an export directory (export_bundle)"
            )
        self.card: dict[str, Any] = json.loads(card_path.read_text())
        self.backend = backend
        self.precision = precision
        self.runner = runner_from_export(self.model_dir, backend, precision, threads)

    def __call__(self, unit: np.ndarray) -> np.ndarray:
        return self.runner(unit)


def load_exported(
    model_dir: str | Path, backend: str = "onnxruntime", precision: str = "fp32"
) -> ExportedModel:
    """Load ``model_dir`` (written by :func:`export_bundle`) for inference with ``backend``."""
    return ExportedModel(model_dir, backend=backend, precision=precision)


# --------------------------------------------------------------------------------------------
# Parity


def _max_hu_error(a: np.ndarray, b: np.ndarray, norm: HUNormalization) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))) * (norm.hu_max - norm.hu_min))


def _check_inputs(ref_hu: np.ndarray, norm: HUNormalization) -> list[tuple[str, np.ndarray]]:
    """The reference slice, plus a batch of 3 crops at a size that needs pad and crop."""
    unit = norm.to_unit(ref_hu.astype(np.float32)).astype(np.float32)
    cases = [("reference", unit[None, None])]
    h, w = unit.shape
    ch, cw = max(2, min(h, 3 * h // 4 + 1)), max(2, min(w, 2 * w // 3 + 3))
    crops = [
        unit[:ch, :cw],
        unit[h - ch :, w - cw :],
        np.ascontiguousarray(unit[:ch, :cw][::-1, ::-1]),
    ]
    cases.append((f"batch3_{ch}x{cw}", np.stack(crops)[:, None].astype(np.float32)))
    return cases


def _parity(
    model_dir: Path,
    eager: nn.Module,
    norm: HUNormalization,
    ref_hu: np.ndarray,
    ref_name: str,
    out: Path,
) -> dict[str, Any]:
    """Eager fp32 vs every file in ``model_dir``, via the same loader that deployment uses.

    Returns the card's ``parity`` entry; more than the tolerance raises ExportParityError
    (``out`` is only named in its message).
    """
    # The loader reads the HU window from the card; the real card needs this parity first.
    (model_dir / CARD_FILE).write_text(
        json.dumps({"normalization": {"hu_min": norm.hu_min, "hu_max": norm.hu_max}})
    )
    checks = []
    worst = dict.fromkeys(EXPORT_BACKENDS, 0.0)
    runners = {b: ExportedModel(model_dir, backend=b) for b in EXPORT_BACKENDS}
    for name, unit in _check_inputs(ref_hu, norm):
        with torch.inference_mode():
            expected = eager(torch.from_numpy(unit)).numpy()
        row: dict[str, Any] = {"case": name, "shape": list(unit.shape)}
        for backend, run in runners.items():
            got = run(unit)
            if got.shape != expected.shape:
                raise ExportParityError(
                    f"{backend} output shape {got.shape} != PyTorch {expected.shape} on {name} {unit.shape}"
                )
            err = _max_hu_error(got, expected, norm)
            row[f"max_abs_hu_{backend}"] = err
            worst[backend] = max(worst[backend], err)
        checks.append(row)
    del runners
    bad = {b: e for b, e in worst.items() if not e <= PARITY_TOLERANCE_HU}
    if bad:
        raise ExportParityError(
            f"exported model disagrees with PyTorch on {ref_name}: max |diff| "
            + ", ".join(f"{b} {e:.3f} HU" for b, e in bad.items())
            + f" > {PARITY_TOLERANCE_HU} HU; nothing was written to {out}"
        )
    return {
        "reference": ref_name,
        "reference_shape": list(ref_hu.shape),
        "tolerance_hu": PARITY_TOLERANCE_HU,
        "max_abs_hu_onnxruntime": worst["onnxruntime"],
        "max_abs_hu_torchscript": worst["torch"],
        "max_abs_hu_openvino": worst["openvino"],
        "provider": "CPUExecutionProvider",
        "checks": checks,
    }


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_entries(model_dir: Path, proto: Any) -> dict[str, Any]:
    """The card's ``files``: format and SHA-256 of each file, the ONNX opset."""
    return {
        ONNX_FILE: {
            "format": "onnx",
            "opset": onnx_opset(proto),
            "sha256": _file_sha256(model_dir / ONNX_FILE),
        },
        TORCHSCRIPT_FILE: {"format": "torchscript", "sha256": _file_sha256(model_dir / TORCHSCRIPT_FILE)},
        OPENVINO_FILE: {"format": "openvino-ir", "sha256": _file_sha256(model_dir / OPENVINO_FILE)},
        OPENVINO_WEIGHTS: {
            "format": "openvino-ir weights",
            "sha256": _file_sha256(model_dir / OPENVINO_WEIGHTS),
        },
    }


# --------------------------------------------------------------------------------------------
# The card


def _hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("loss.", "optim.", "model.")
    extra = ("train.n_critic", "train.batch_size", "train.iterations", "data.patch_size", "train.seed")
    return {k: v for k, v in config.items() if k.startswith(keys) or k in extra}


def _throughput(meta: dict[str, Any]) -> dict[str, Any] | None:
    if isinstance(meta.get("throughput"), dict):
        return meta["throughput"]
    tags = meta.get("tags") or {}
    found = {
        k: v for k, v in tags.items() if ("fps" in k.lower() or "device" in k.lower()) and k != "fps_gate"
    }
    if meta.get("fps") is not None:
        found.update(
            {"fps": meta["fps"], "device": meta.get("device"), "device_name": meta.get("device_name")}
        )
    return found or None


def _precision_gate(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The gate verdict ``ldct-best validate`` measured for the promoted path (tag ``fps_gate``)."""
    if isinstance(meta.get("precision_gate"), dict):
        return meta["precision_gate"]
    raw = (meta.get("tags") or {}).get("fps_gate")
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {"unparsed": raw}


def _architecture(generator: nn.Module, config: dict[str, Any], multiple: int) -> dict[str, Any]:
    return {
        "class": type(getattr(generator, "module", generator)).__name__,
        "arch": config.get("model.arch", getattr(generator, "arch", "encoder_decoder")),
        "encoder": config.get("model.encoder", getattr(generator, "encoder_name", None)),
        "out_indices": config.get("model.out_indices"),
        "decoder_channels": config.get("model.decoder_channels"),
        "pad_multiple": multiple,
        "parameters": int(sum(p.numel() for p in generator.parameters())),
    }


def _metric_conventions() -> dict[str, str]:
    return {
        "body": "*_body: inside the full dose's body mask (> -500 HU, largest component, holes filled, "
        "eroded 2 px), HU clipped to the slice's anatomy window (brain [0, 80] for a head, else soft "
        "tissue [-160, 240]), data range = window width; rmse_body_hu unclipped",
        "full": "HU clipped to [-1024, 3072], data range 4096",
        "window": "HU clipped to [-160, 240] (abdomen window), data range 400",
        "ssim": "Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, population covariance",
        "rmse_hu": "root mean squared error in HU",
        "rows": "'ldct' = the low-dose input scored against full dose; 'denoised' = model output",
    }


def _interface(norm: HUNormalization, multiple: int) -> dict[str, Any]:
    """The card's ``normalization``, ``input`` and ``output``: how to feed the model from HU."""
    span = f"({norm.hu_max:g} - ({norm.hu_min:g}))"
    return {
        "normalization": {
            "hu_min": norm.hu_min,
            "hu_max": norm.hu_max,
            "forward": "HU -> clip to [hu_min,hu_max] -> (hu-hu_min)/(hu_max-hu_min)",
            "inverse": "hu = y*(hu_max-hu_min)+hu_min (not clipped)",
            "hu_from_dicom": "pixel_array * RescaleSlope + RescaleIntercept",
        },
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 1, "height", "width"],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "preprocessing": f"unit = clip((hu - ({norm.hu_min:g})) / {span}, 0, 1)",
            "min_size": multiple if multiple > 1 else 2,
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", 1, "height", "width"],
            "dtype": "float32",
            "range": "nominally [0, 1]; not clipped (input + predicted residual)",
            "postprocessing": f"hu = output * {span} + ({norm.hu_min:g})",
        },
    }


def _export_methods(replaced: int) -> dict[str, Any]:
    return {
        "onnx": (
            "torch.export (non-strict) of the core for H, W = k * pad_multiple, translated by "
            "torch.onnx.export(dynamo=True); reflect Pad to the multiple and Slice back added as ONNX nodes"
        ),
        "torchscript": "torch.jit.trace of the same core inside a torch.jit.script pad/crop wrapper",
        "openvino": "openvino.convert_model(model.onnx), saved with fp32 weights (compress_to_fp16=False)",
        "timm_same_convs_made_static": replaced,
    }


def _versions() -> dict[str, str | None]:
    import onnx
    import onnxruntime

    return {
        "ldct": getattr(ldct, "__version__", None),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": library_versions("openvino")["openvino_version"],
    }


def _card(
    generator: nn.Module,
    meta: dict[str, Any],
    norm: HUNormalization,
    multiple: int,
    parity: dict[str, Any],
    files: dict[str, Any],
    replaced: int,
) -> dict[str, Any]:
    config = dict(meta.get("config") or {})
    return {
        "card_format": CARD_FORMAT,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "registered_model": meta.get("registered_model") or meta.get("name") or "ldct-denoiser",
        "version": meta.get("version"),
        "run_id": meta.get("run_id"),
        "aliases": meta.get("aliases") or ([meta["alias"]] if meta.get("alias") else []),
        "source": {
            k: meta[k]
            for k in ("run_id", "version", "aliases", "study", "tracking_uri", "model_uri")
            if k in meta
        },
        "architecture": _architecture(generator, config, multiple),
        "hyperparameters": _hyperparameters(config),
        "config": config,
        "metrics": meta.get("metrics") or {},
        "metric_conventions": _metric_conventions(),
        "throughput": _throughput(meta),
        # Measured deltas of the validated path vs fp32 on the test panel (docs/DESIGN.md §5b).
        "precision_gate": _precision_gate(meta),
        **_interface(norm, multiple),
        "files": files,
        "export": _export_methods(replaced),
        "parity_max_abs_hu": parity["max_abs_hu_onnxruntime"],
        "parity": parity,
        "versions": _versions(),
    }


# --------------------------------------------------------------------------------------------
# The entry point


def _write_models(model_dir: Path, core: nn.Module, multiple: int) -> Any:
    """model.onnx, model.pt and model.xml/.bin of ``core`` into ``model_dir``; returns the ONNX proto."""
    import onnx

    proto = onnx_model(core, multiple)
    onnx.save_model(proto, str(model_dir / ONNX_FILE))
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is the one format that
        # is self-contained (pad/crop included) and takes any H, W without ldct or timm.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
        torch.jit.save(torchscript_model(core, multiple), str(model_dir / TORCHSCRIPT_FILE))
    onnx_to_openvino(model_dir / ONNX_FILE, model_dir / OPENVINO_FILE)
    return proto


def _swap_into_place(tmp: Path, out: Path) -> None:
    # The old export (if forced) is moved aside first and removed last, so that a failure
    # midway leaves either the old or the new export at ``out``, never a mix.
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_bundle(
    generator: nn.Module,
    meta: dict[str, Any],
    out_dir: str | Path,
    force: bool = False,
    reference_slice_hu: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write model.onnx, model.pt, model.xml/.bin and model_card.json for ``generator`` into ``out_dir``.

    ``meta`` is the bundle's meta (config, normalization, version, run_id, metrics, throughput).
    The ONNX model (onnxruntime, CPU), the TorchScript model and the OpenVINO IR (fp32) are compared with eager PyTorch
    on ``reference_slice_hu`` (default: pydicom's CT_small.dcm, in HU) and on a batch of 3 crops
    of another size; more than 1 HU raises ExportParityError. An existing non-empty ``out_dir`` is
    refused unless ``force``. Everything is written to a temporary directory next to ``out_dir``
    and renamed into place, so a failed export leaves nothing behind. Returns the card (plus
    ``out_dir``).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(
            f"export directory {out} already exists: pass force=True (--force) to replace it"
        )
    norm = normalization_from_meta(meta)
    ref_hu, ref_name = _reference(reference_slice_hu)
    eager, core, multiple, replaced = prepare_export(generator)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        proto = _write_models(tmp, core, multiple)
        parity = _parity(tmp, eager, norm, ref_hu, ref_name, out)
        files = _file_entries(tmp, proto)
        card = _card(eager, meta, norm, multiple, parity, files, replaced)
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2, default=str) + "\n")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**card, "out_dir": str(out)}
