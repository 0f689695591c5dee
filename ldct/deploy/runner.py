"""The one interface every inference backend implements: :class:`Runner`.

A runner maps a float32 batch ``unit [N,1,H,W]`` in [0, 1] to the generator's output (same
shape, numpy) on one backend at one precision. The concrete runners live one module per
runtime (:mod:`ldct.deploy.torch_runner`, :mod:`ldct.deploy.onnxruntime_runner`,
:mod:`ldct.deploy.openvino_runner`); :mod:`ldct.deploy.backends` registers them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn

from ldct.deploy.capabilities import _cpu_device_name, _cuda_device_name, library_versions
from ldct.deploy.convert import ONNX_FILE, export_onnx
from ldct.errors import LdctError

# Every precision some runner can run at (each runner lists its own subset in ``precisions``).
RUNNER_PRECISIONS = ("fp32", "bf16", "fp16", "int8")


class BackendUnavailable(LdctError, RuntimeError):
    """This backend/precision cannot run on this machine (the message says what is missing)."""


class Runner:
    """One backend at one precision: ``runner(unit [N,1,H,W] float32) -> np.ndarray`` (same shape)."""

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]
    device_type: ClassVar[str] = "cpu"
    libraries: ClassVar[tuple[str, ...]] = ()

    def __init__(self, precision: str, threads: int | None = None) -> None:
        self.precision = precision
        self.threads = threads

    # ----- what every backend provides

    @classmethod
    def unavailable(cls, precision: str) -> str | None:
        """Why ``precision`` cannot run here (None when it can)."""
        if precision not in cls.precisions:
            return f"backend {cls.name!r} has no precision {precision!r} (it has {', '.join(cls.precisions)})"
        return None

    @classmethod
    def check(cls, precision: str) -> None:
        reason = cls.unavailable(precision)
        if reason:
            raise BackendUnavailable(reason)

    @classmethod
    def from_generator(
        cls,
        generator: nn.Module,
        precision: str = "fp32",
        workdir: str | Path | None = None,
        calibration: Sequence[np.ndarray] | None = None,
        threads: int | None = None,
    ) -> Runner:
        raise NotImplementedError

    @classmethod
    def from_export(
        cls, model_dir: str | Path, precision: str = "fp32", threads: int | None = None
    ) -> Runner:
        raise NotImplementedError

    def __call__(self, unit: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # ----- shared

    @property
    def device_name(self) -> str:
        return _cuda_device_name() if self.device_type == "cuda" else _cpu_device_name(self.threads)

    def describe(self) -> dict[str, Any]:
        """Backend, precision, device and library versions: what an FPS figure must be tagged with."""
        return {
            "backend": self.name,
            "precision": self.precision,
            "device": self.device_type,
            "device_name": self.device_name,
            **library_versions(*self.libraries),
        }

    @property
    def label(self) -> str:
        return f"{self.name} {self.precision}"


def _need_calibration(calibration: Sequence[np.ndarray] | None, what: str) -> list[np.ndarray]:
    if not calibration:
        raise ValueError(
            f"{what} int8 quantisation needs calibration slices (training data, never test): "
            "pass calibration=[unit [1,1,H,W] float32, ...]"
        )
    return [np.ascontiguousarray(c, dtype=np.float32) for c in calibration]


def _workdir(workdir: str | Path | None) -> Path:
    if workdir is None:
        # Kept alive as long as the process: the runner's session may memory-map its files.
        workdir = tempfile.mkdtemp(prefix="ldct-runner-")
    path = Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _onnx_for(generator: nn.Module, workdir: Path) -> Path:
    path = workdir / ONNX_FILE
    if not path.is_file():
        export_onnx(generator, path)
    return path
