"""OpenVINO runner on the CPU: fp32, bf16 (native only) and NNCF int8."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ldct.deploy.capabilities import _ov_core, cpu_capabilities, cpu_name
from ldct.deploy.convert import OPENVINO_FILE, onnx_to_openvino, quantize_openvino_int8
from ldct.deploy.runner import Runner, _need_calibration, _onnx_for, _workdir


class OpenVINORunner(Runner):
    """OpenVINO on the CPU: fp32 (``INFERENCE_PRECISION_HINT=f32``), bf16 (native only), NNCF int8.

    OpenVINO's default precision on a CPU with bf16 is bf16; it is always set explicitly here, so
    that a figure labelled fp32 is fp32.
    """

    name = "openvino"
    precisions = ("fp32", "bf16", "int8")
    libraries = ("openvino", "nncf")

    def __init__(self, model: Any, precision: str = "fp32", threads: int | None = None) -> None:
        super().__init__(precision, threads)
        self.check(precision)
        config: dict[str, Any] = {
            # int8 layers are int8 by the model; the remaining float layers run in fp32 so that
            # the int8 row measures quantisation alone.
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = _ov_core().compile_model(model, "CPU", config)
        self._request = self.compiled.create_infer_request()

    @classmethod
    def unavailable(cls, precision: str) -> str | None:
        reason = super().unavailable(precision)
        if reason:
            return reason
        try:
            caps = list(_ov_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        except ImportError:
            return "backend 'openvino' needs openvino (pip install openvino)"
        if precision == "bf16" and not (cpu_capabilities()["native_bf16"] and "BF16" in caps):
            return (
                f"openvino bf16 on {cpu_name()}: no native bf16 (CPU plugin capabilities {caps}); "
                "use fp32 or int8"
            )
        if precision == "int8":
            try:
                import nncf  # noqa: F401
            except ImportError:
                return "openvino int8 needs NNCF (pip install nncf)"
        return None

    @classmethod
    def _build(
        cls,
        xml_or_onnx: Path,
        precision: str,
        calibration: Sequence[np.ndarray] | None,
        threads: int | None,
    ) -> OpenVINORunner:
        model = _ov_core().read_model(str(xml_or_onnx))
        if precision == "int8":
            model = quantize_openvino_int8(model, _need_calibration(calibration, "openvino"))
        return cls(model, precision, threads)

    @classmethod
    def from_generator(
        cls,
        generator: nn.Module,
        precision: str = "fp32",
        workdir: str | Path | None = None,
        calibration: Sequence[np.ndarray] | None = None,
        threads: int | None = None,
    ) -> OpenVINORunner:
        cls.check(precision)
        if precision == "int8":
            calibration = _need_calibration(calibration, cls.name)  # before the (slow) export
        work = _workdir(workdir)
        xml = work / OPENVINO_FILE
        if not xml.is_file():
            onnx_to_openvino(_onnx_for(generator, work), xml)
        return cls._build(xml, precision, calibration, threads)

    @classmethod
    def from_export(
        cls, model_dir: str | Path, precision: str = "fp32", threads: int | None = None
    ) -> OpenVINORunner:
        cls.check(precision)
        if precision == "int8":
            raise ValueError(
                "an int8 OpenVINO model is built by validate from training data, not loaded from an export"
            )
        xml = Path(model_dir) / OPENVINO_FILE
        if not xml.is_file():
            raise FileNotFoundError(
                f"{xml} not found: this export predates the OpenVINO IR; re-run `ldct-best export --force`"
            )
        return cls._build(xml, precision, None, threads)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.precision != "int8":
            info.pop("nncf_version", None)
        return info

    def __call__(self, unit: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(unit, dtype=np.float32)
        # A copy: the request's output buffer is reused by the next call.
        return np.array(self._request.infer({0: x})[self.compiled.output(0)], dtype=np.float32, copy=True)
