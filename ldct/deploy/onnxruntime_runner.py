"""onnxruntime runners: CPU provider (fp32, int8 QDQ), CUDA provider (fp32, fp16) and TensorRT.

onnxruntime falls back to its CPU provider silently when a CUDA/TensorRT provider cannot load,
so every session is checked for the provider it really got.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn

from ldct.deploy.capabilities import _cuda_device_name
from ldct.deploy.convert import INPUT_NAME, ONNX_FILE, onnx_to_fp16, quantize_onnx_int8
from ldct.deploy.runner import BackendUnavailable, Runner, _need_calibration, _onnx_for, _workdir


def _ort_options(threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle ORT threads spin by default and steal the (shared, few) cores from whatever runs next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRuntimeRunner(Runner):
    """onnxruntime on its CPU provider: the exported model.onnx, or its int8 QDQ quantisation."""

    name = "onnxruntime"
    precisions = ("fp32", "int8")
    providers: ClassVar[tuple[str, ...]] = ("CPUExecutionProvider",)
    libraries = ("onnxruntime",)

    def __init__(self, onnx_path: str | Path, precision: str = "fp32", threads: int | None = None) -> None:
        super().__init__(precision, threads)
        self.check(precision)
        import onnxruntime as ort

        self.onnx_path = Path(onnx_path)
        self.session = ort.InferenceSession(
            str(self.onnx_path), _ort_options(threads), providers=self._provider_options()
        )
        got = self.session.get_providers()
        if got[0] != self.providers[0]:
            # onnxruntime drops a provider it cannot load and carries on with the CPU one.
            raise BackendUnavailable(
                f"backend {self.name!r}: onnxruntime gave providers {got} instead of {self.providers[0]}; "
                "the CUDA/TensorRT libraries could not be loaded on this machine"
            )

    def _provider_options(self) -> list[Any]:
        return list(self.providers)

    @classmethod
    def unavailable(cls, precision: str) -> str | None:
        reason = super().unavailable(precision)
        if reason:
            return reason
        try:
            import onnxruntime as ort
        except ImportError:
            return f"backend {cls.name!r} needs onnxruntime (pip install onnxruntime)"
        have = ort.get_available_providers()
        if cls.providers[0] not in have:
            return (
                f"backend {cls.name!r} needs onnxruntime's {cls.providers[0]}, but onnxruntime "
                f"{ort.__version__} here has only {have}: install onnxruntime-gpu on a CUDA machine, "
                "or use --backend onnxruntime|openvino on this one"
            )
        return None

    @classmethod
    def _model_for(
        cls, onnx_path: Path, precision: str, calibration: Sequence[np.ndarray] | None, workdir: Path
    ) -> Path:
        if precision == "int8":
            return quantize_onnx_int8(
                onnx_path, _need_calibration(calibration, "onnxruntime"), workdir / "int8.onnx"
            )
        return onnx_path

    @classmethod
    def from_generator(
        cls,
        generator: nn.Module,
        precision: str = "fp32",
        workdir: str | Path | None = None,
        calibration: Sequence[np.ndarray] | None = None,
        threads: int | None = None,
    ) -> OnnxRuntimeRunner:
        cls.check(precision)
        if precision == "int8":
            calibration = _need_calibration(calibration, cls.name)  # before the (slow) export
        work = _workdir(workdir)
        return cls(
            cls._model_for(_onnx_for(generator, work), precision, calibration, work), precision, threads
        )

    @classmethod
    def from_export(
        cls, model_dir: str | Path, precision: str = "fp32", threads: int | None = None
    ) -> OnnxRuntimeRunner:
        cls.check(precision)
        if precision == "int8":
            raise ValueError(
                "an int8 onnxruntime model is built by validate from training data, not loaded from an export"
            )
        return cls(Path(model_dir) / ONNX_FILE, precision, threads)

    def __call__(self, unit: np.ndarray) -> np.ndarray:
        return self.session.run(None, {INPUT_NAME: np.ascontiguousarray(unit, dtype=np.float32)})[0]


class OnnxRuntimeCudaRunner(OnnxRuntimeRunner):
    """onnxruntime's CUDA execution provider; fp16 runs an fp16 copy of the graph (float I/O kept)."""

    name = "onnxruntime-cuda"
    precisions = ("fp16", "fp32")
    providers = ("CUDAExecutionProvider",)
    device_type = "cuda"

    @property
    def device_name(self) -> str:
        return _cuda_device_name()

    @classmethod
    def _model_for(
        cls, onnx_path: Path, precision: str, calibration: Sequence[np.ndarray] | None, workdir: Path
    ) -> Path:
        if precision != "fp16":
            return onnx_path
        return onnx_to_fp16(onnx_path, workdir / "fp16.onnx")

    @classmethod
    def from_export(
        cls, model_dir: str | Path, precision: str = "fp16", threads: int | None = None
    ) -> OnnxRuntimeCudaRunner:
        cls.check(precision)
        return cls(
            cls._model_for(Path(model_dir) / ONNX_FILE, precision, None, _workdir(None)), precision, threads
        )


class TensorRTRunner(OnnxRuntimeRunner):
    """onnxruntime's TensorRT execution provider, fp16 kernels, engines cached in the work dir.

    Dynamic N/H/W need an optimisation profile: 1x1x32x32 .. 8x1x1024x1024, tuned for 1x1x512x512.
    """

    name = "tensorrt"
    precisions = ("fp16", "fp32")
    providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    device_type = "cuda"

    def _provider_options(self) -> list[Any]:
        cache = self.onnx_path.parent / "trt-cache"
        options = {
            "trt_fp16_enable": self.precision == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_profile_min_shapes": f"{INPUT_NAME}:1x1x32x32",
            "trt_profile_opt_shapes": f"{INPUT_NAME}:1x1x512x512",
            "trt_profile_max_shapes": f"{INPUT_NAME}:8x1x1024x1024",
        }
        return [(self.providers[0], options), self.providers[1]]

    @classmethod
    def from_export(
        cls, model_dir: str | Path, precision: str = "fp16", threads: int | None = None
    ) -> TensorRTRunner:
        cls.check(precision)
        return cls(Path(model_dir) / ONNX_FILE, precision, threads)
