"""The registered model: an MLflow "models from code" pyfunc over safetensors weights.

What a registered version holds (``models:/ldct-denoiser/<v>``)::

    MLmodel                      python_function flavour, explicit signature [N, H, W] float32 HU,
                                 metadata {ldct_format, normalization, config, metrics, ...}
    ldct_pyfunc.py               the models-from-code script (only `mlflow models serve` /
                                 mlflow.pyfunc.load_model execute it)
    code/ldct/                   this package, so the model serves outside the checkout
    artifacts/weights.safetensors  generator weights (pure data)
    artifacts/ldct_model.json      format, flat config, HU normalisation
    artifacts/model.onnx           the ONNX export of the same generator (pad/crop inside)
    requirements.txt             torch, timm, numpy, safetensors (all on PyPI)

Why not ``pt2``: ``torch.export`` with dynamic H/W on timm encoders needs divisibility
constraints and re-export per architecture, and the program would still take [0, 1] input.
Here the generator is rebuilt from its own config by this package, so any batch and size work,
the pyfunc takes and returns HU, and ldct's own loaders (:func:`read_model_files`) read only
JSON and safetensors: they never execute a file from the store, not even ``ldct_pyfunc.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ldct.config import HUNormalization
from ldct.errors import LdctError
from ldct.training.checkpoint import generator_from_config

MODEL_FORMAT = "ldct-pyfunc-1"
WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "ldct_model.json"
ONNX_FILE = "model.onnx"
PYFUNC_SCRIPT = Path(__file__).with_name("ldct_pyfunc.py")


class ModelFormatError(LdctError, ValueError):
    """A registered model's files are not the safe ldct format; the message says what to do."""


def write_model_files(state: dict[str, Any], directory: Path) -> dict[str, Path]:
    """Write ``weights.safetensors`` and ``ldct_model.json`` of a checkpoint's generator."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in state["generator"].items()}
    save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": MODEL_FORMAT})
    spec = {
        "format": MODEL_FORMAT,
        "config": state["config"],
        "normalization": state["normalization"],
    }
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=1))
    return {"weights": directory / WEIGHTS_FILE, "spec": directory / SPEC_FILE}


def read_model_files(weights_path: str | Path, spec_path: str | Path) -> tuple[Any, dict[str, Any]]:
    """The generator (eval mode, [N,1,H,W] in [0, 1]) and the spec, from plain-data files only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        spec = json.loads(Path(spec_path).read_text())
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{spec_path}: not a readable {SPEC_FILE} ({exc})") from exc
    if not isinstance(spec, dict) or spec.get("format") != MODEL_FORMAT:
        raise ModelFormatError(
            f"{spec_path}: format {spec.get('format') if isinstance(spec, dict) else spec!r}, expected {MODEL_FORMAT!r}"
        )
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFormatError(f"{weights_path}: not a safetensors file ({exc})") from exc
    generator, _ = generator_from_config(spec["config"], weights)
    return generator, spec


def signature() -> Any:
    """[N, H, W] float32 HU in, same out; H and W are free (-1), so any slice size is accepted."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # Unnamed: `{"inputs": [[[...]]]}` then reaches predict as one array, not a dict of arrays.
    spec = Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))])
    return ModelSignature(inputs=spec, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]))


def denoise_hu(generator: Any, normalization: dict[str, float], hu: np.ndarray) -> np.ndarray:
    """HU [N,H,W] (or [H,W]) -> denoised HU of the same shape, float32 (not clipped)."""
    import torch

    norm = HUNormalization(float(normalization["hu_min"]), float(normalization["hu_max"]))
    array = np.asarray(hu, dtype=np.float32)
    squeeze = array.ndim == 2
    if squeeze:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"expected HU slices [N, H, W] or one slice [H, W], got shape {array.shape}")
    out = np.empty_like(array)
    with torch.inference_mode():
        for i, image in enumerate(array):
            unit = torch.from_numpy(norm.to_unit(image).astype(np.float32))[None, None]
            out[i] = norm.to_hu(generator(unit).float().numpy()[0, 0])
    return out[0] if squeeze else out


def _mlflow_python_model() -> type:
    from mlflow.pyfunc import PythonModel

    class HUDenoiser(PythonModel):
        """pyfunc: HU slices [N, H, W] -> denoised HU (normalisation inside, any H and W)."""

        def load_context(self, context: Any) -> None:
            self.generator, self.spec = read_model_files(
                context.artifacts["weights"], context.artifacts["spec"]
            )

        # model_input unannotated on purpose: MLflow reads that hint as a schema and warns on Any;
        # the logged signature ([N, H, W] float32) is the schema.
        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
            if isinstance(model_input, dict) and len(model_input) == 1:  # {"name": array}
                model_input = next(iter(model_input.values()))
            if hasattr(model_input, "to_numpy"):  # a DataFrame of one slice's rows
                model_input = model_input.to_numpy()
            return denoise_hu(self.generator, self.spec["normalization"], model_input)

    return HUDenoiser


def pyfunc_model() -> Any:
    """The PythonModel instance the models-from-code script hands to ``mlflow.models.set_model``."""
    return _mlflow_python_model()()
