"""Inference runners behind one small interface: torch, onnxruntime, OpenVINO and the CUDA paths.

A runner maps a float32 batch ``unit [N,1,H,W]`` in [0, 1] to the generator's output (same shape,
numpy) on one backend at one precision. ``validate`` times and gates runners, ``export`` checks
its files with them, ``denoise`` runs them; adding a backend is one :class:`Runner` subclass in
:data:`BACKENDS`.

Each runner is built either from an in-memory generator (``from_generator``: the ONNX / OpenVINO
files it needs are written to a work directory) or from an export directory (``from_export``).
Reduced precisions:

- ``bf16``: torch autocast, or OpenVINO's ``INFERENCE_PRECISION_HINT=bf16``; refused on a CPU
  without native bf16 (AVX512_BF16 or AMX), where it is emulated and slower than fp32.
- ``int8``: post-training static quantisation calibrated on *training* slices (never test):
  OpenVINO NNCF (``nncf.quantize``) or onnxruntime's per-channel QDQ quantiser.
- ``fp16``: CUDA only (torch autocast, onnxruntime CUDA EP on an fp16 graph, TensorRT).

A CUDA path on a machine that cannot run it raises :class:`BackendUnavailable` naming what is
missing; onnxruntime would otherwise fall back to its CPU provider silently, so every CUDA
session is checked for the provider it really got.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.pt"
OPENVINO_FILE = "model.xml"
INPUT_NAME = "input"
PRECISIONS = ("fp32", "bf16", "fp16", "int8")


class BackendUnavailable(RuntimeError):
    """This backend/precision cannot run on this machine (the message says what is missing)."""


# --------------------------------------------------------------------------------------------
# What this machine can do


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_capabilities() -> dict[str, Any]:
    """What matters for reduced precision on this CPU, read from the CPU, never assumed.

    ``native_bf16``: bf16 dot products in hardware (AVX512_BF16 on Zen 4 / Cooper Lake, AMX on
    Sapphire Rapids); without it bf16 is emulated. ``vnni``: int8 dot products (AVX512_VNNI or
    AVX-VNNI). ``openvino``: the OpenVINO CPU plugin's own OPTIMIZATION_CAPABILITIES.
    """
    flags = cpu_flags()
    caps: dict[str, Any] = {
        "cpu": _cpu_name(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "avx512_vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "amx_int8": "amx_int8" in flags,
    }
    caps["native_bf16"] = caps["avx512_bf16"] or caps["amx_bf16"]
    caps["vnni"] = caps["avx512_vnni"] or caps["amx_int8"]
    caps["openvino"] = None
    with contextlib.suppress(Exception):
        caps["openvino"] = list(_ov_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return caps


def format_capabilities(caps: dict[str, Any]) -> str:
    keys = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    have = ", ".join(f"{k} {'yes' if caps[k] else 'no'}" for k in keys)
    ov = ",".join(caps["openvino"]) if caps.get("openvino") else "not available"
    return f"{caps['cpu']}: {have}; native bf16 {'yes' if caps['native_bf16'] else 'no'}; OpenVINO CPU: {ov}"


def _cpu_name() -> str:
    from ldct.deploy.throughput import cpu_name

    return cpu_name()


def _cpu_device_name(threads: int | None) -> str:
    return f"{_cpu_name()} ({threads or torch.get_num_threads()} threads of {os.cpu_count()} CPUs)"


def _cuda_device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"


@functools.lru_cache(maxsize=1)
def _ov_core() -> Any:
    import openvino as ov

    return ov.Core()


def library_versions(*names: str) -> dict[str, str | None]:
    """``{"torch_version": ..., "<name>_version": ...}`` for the libraries a path used."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"torch_version": torch.__version__}
    for name in names:
        try:
            out[f"{name.replace('-', '_')}_version"] = version(name)
        except PackageNotFoundError:
            out[f"{name.replace('-', '_')}_version"] = None
    return out


# --------------------------------------------------------------------------------------------
# The interface


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
    from ldct.deploy.export import export_onnx

    path = workdir / ONNX_FILE
    if not path.is_file():
        export_onnx(generator, path)
    return path


# --------------------------------------------------------------------------------------------
# torch


class TorchRunner(Runner):
    """Eager PyTorch (from a generator) or TorchScript (from an export); bf16/fp16 by autocast."""

    name = "torch"
    precisions = ("fp32", "bf16")

    def __init__(self, module: nn.Module, precision: str = "fp32", threads: int | None = None) -> None:
        super().__init__(precision, threads)
        self.check(precision)
        self.module = module.eval()
        self._device = torch.device(self.device_type)

    @classmethod
    def unavailable(cls, precision: str) -> str | None:
        reason = super().unavailable(precision)
        if reason is None and precision == "bf16" and not cpu_capabilities()["native_bf16"]:
            return (
                f"torch bf16 on {_cpu_name()}: no native bf16 (neither AVX512_BF16 nor AMX); "
                "emulated bf16 is slower than fp32. Use fp32 or another backend."
            )
        return reason

    @classmethod
    def from_generator(cls, generator, precision="fp32", workdir=None, calibration=None, threads=None):
        import copy

        cls.check(precision)
        net = copy.deepcopy(getattr(generator, "module", generator)).float().to(cls.device_type).eval()
        return cls(net, precision, threads)

    @classmethod
    def from_export(cls, model_dir, precision="fp32", threads=None):
        cls.check(precision)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
            module = torch.jit.load(str(Path(model_dir) / TORCHSCRIPT_FILE), map_location=cls.device_type)
        return cls(module, precision, threads)

    def __call__(self, unit: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32)).to(self._device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with (
            torch.inference_mode(),
            torch.autocast(self._device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None),
        ):
            return self.module(x).float().cpu().numpy()


class TorchCudaRunner(TorchRunner):
    """Eager PyTorch on CUDA: fp32, or fp16 / bf16 autocast (the paper's T4 figure is fp16)."""

    name = "torch-cuda"
    precisions = ("fp16", "fp32", "bf16")
    device_type = "cuda"

    @classmethod
    def unavailable(cls, precision: str) -> str | None:
        if precision not in cls.precisions:
            return f"backend {cls.name!r} has no precision {precision!r} (it has {', '.join(cls.precisions)})"
        if not torch.cuda.is_available():
            return (
                f"backend {cls.name!r} needs a CUDA device; torch {torch.__version__} sees none on "
                "this machine. Run it on a GPU machine, or use --backend torch|onnxruntime|openvino here."
            )
        return None


# --------------------------------------------------------------------------------------------
# onnxruntime


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


class _Calibration:
    """onnxruntime CalibrationDataReader over unit slices [1,1,H,W]."""

    def __init__(self, slices: Iterable[np.ndarray]) -> None:
        self._items = iter([{INPUT_NAME: s} for s in slices])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def quantize_onnx_int8(onnx_path: Path, calibration: Sequence[np.ndarray], out_path: Path) -> Path:
    """Static per-channel QDQ int8 of the Conv layers, calibrated on ``calibration`` (training data).

    The input scaling, the final residual add and the pad/crop stay float: they carry the image
    itself, and rounding them to 8 bits would cost ~16 HU on a [-1024, 3072] HU input.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre),
        str(out_path),
        _Calibration(calibration),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv"],
        nodes_to_exclude=_onnx_image_convs(onnx.load(str(pre))),
        per_channel=True,
        # Without VNNI, u8 x s8 products saturate in vpmaddubsw; 7-bit weights avoid it.
        reduce_range=not cpu_capabilities()["vnni"],
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    pre.unlink(missing_ok=True)
    return out_path


def _onnx_image_convs(proto: Any) -> list[str]:
    """Conv nodes that read the image itself (reachable from the graph input without a Conv).

    Quantising their input would put the image on an 8-bit grid (16 HU steps over 4096 HU), and
    the residual skip shares that tensor; these convolutions stay float.
    """
    image = {i.name for i in proto.graph.input}
    first = []
    for node in proto.graph.node:  # ONNX nodes are topologically sorted
        if not any(t in image for t in node.input):
            continue
        if node.op_type == "Conv":
            first.append(node.name)
        else:
            image.update(node.output)
    return first


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
    def _model_for(cls, onnx_path: Path, precision: str, calibration, workdir: Path) -> Path:
        if precision == "int8":
            return quantize_onnx_int8(
                onnx_path, _need_calibration(calibration, "onnxruntime"), workdir / "int8.onnx"
            )
        return onnx_path

    @classmethod
    def from_generator(cls, generator, precision="fp32", workdir=None, calibration=None, threads=None):
        cls.check(precision)
        if precision == "int8":
            calibration = _need_calibration(calibration, cls.name)  # before the (slow) export
        work = _workdir(workdir)
        return cls(
            cls._model_for(_onnx_for(generator, work), precision, calibration, work), precision, threads
        )

    @classmethod
    def from_export(cls, model_dir, precision="fp32", threads=None):
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
    def _model_for(cls, onnx_path, precision, calibration, workdir):
        if precision != "fp16":
            return onnx_path
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        out = workdir / "fp16.onnx"
        onnx.save_model(convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True), str(out))
        return out

    @classmethod
    def from_export(cls, model_dir, precision="fp16", threads=None):
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
    def from_export(cls, model_dir, precision="fp16", threads=None):
        cls.check(precision)
        return cls(Path(model_dir) / ONNX_FILE, precision, threads)


# --------------------------------------------------------------------------------------------
# OpenVINO


def onnx_to_openvino(onnx_path: Path, xml_path: Path) -> Path:
    """model.onnx -> model.xml/.bin with the ONNX model's dynamic N/H/W, weights kept in fp32."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    # save_model compresses weights to fp16 by default; the fp32 IR is the reference for every
    # precision (bf16/int8 are chosen at compile time or by NNCF, and judged against it).
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return xml_path


def quantize_openvino_int8(model: Any, calibration: Sequence[np.ndarray]) -> Any:
    """NNCF post-training quantisation of an OpenVINO model on ``calibration`` (training slices).

    Mixed preset: symmetric int8 weights (per channel), asymmetric activations; the image path
    (input scaling, the convolutions reading the image, the residual add) stays float.
    """
    import logging

    import nncf

    nncf.set_log_level(logging.WARNING)  # its INFO lines list every ignored node
    dataset = nncf.Dataset(list(calibration))
    return nncf.quantize(
        model,
        dataset,
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(calibration),
        fast_bias_correction=True,
        ignored_scope=nncf.IgnoredScope(names=_openvino_image_ops(model), validate=False),
    )


def _openvino_image_ops(model: Any) -> list[str]:
    """Ops that touch the image itself: convolutions reading it and elementwise ops combining it.

    NNCF would otherwise put a quantiser on the model input (moved up through Pad, so the
    residual skip reads the 8-bit image: measured 500 HU off at bone) and on the residual
    before the final add. Shape arithmetic reachable from the input is listed too; NNCF does
    not quantise it either way.
    """
    image: set[str] = set()
    ignored = []
    for op in model.get_ordered_ops():
        kind, name = op.get_type_name(), op.get_friendly_name()
        if kind == "Parameter":
            image.add(name)
            continue
        if not any(
            op.input_value(i).get_node().get_friendly_name() in image for i in range(op.get_input_size())
        ):
            continue
        if kind in ("Convolution", "GroupConvolution"):
            ignored.append(name)
            continue
        image.add(name)
        if kind in ("Add", "Subtract", "Multiply", "Divide", "Concat", "MatMul"):
            ignored.append(name)
    return ignored


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
                f"openvino bf16 on {_cpu_name()}: no native bf16 (CPU plugin capabilities {caps}); "
                "use fp32 or int8"
            )
        if precision == "int8":
            try:
                import nncf  # noqa: F401
            except ImportError:
                return "openvino int8 needs NNCF (pip install nncf)"
        return None

    @classmethod
    def _build(cls, xml_or_onnx: Path, precision: str, calibration, threads) -> OpenVINORunner:
        model = _ov_core().read_model(str(xml_or_onnx))
        if precision == "int8":
            model = quantize_openvino_int8(model, _need_calibration(calibration, "openvino"))
        return cls(model, precision, threads)

    @classmethod
    def from_generator(cls, generator, precision="fp32", workdir=None, calibration=None, threads=None):
        cls.check(precision)
        if precision == "int8":
            calibration = _need_calibration(calibration, cls.name)  # before the (slow) export
        work = _workdir(workdir)
        xml = work / OPENVINO_FILE
        if not xml.is_file():
            onnx_to_openvino(_onnx_for(generator, work), xml)
        return cls._build(xml, precision, calibration, threads)

    @classmethod
    def from_export(cls, model_dir, precision="fp32", threads=None):
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


# --------------------------------------------------------------------------------------------
# Registry


BACKENDS: dict[str, type[Runner]] = {
    cls.name: cls
    for cls in (
        TorchRunner,
        OnnxRuntimeRunner,
        OpenVINORunner,
        TorchCudaRunner,
        OnnxRuntimeCudaRunner,
        TensorRTRunner,
    )
}
CPU_BACKENDS = tuple(n for n, c in BACKENDS.items() if c.device_type == "cpu")
CUDA_BACKENDS = tuple(n for n, c in BACKENDS.items() if c.device_type == "cuda")


def backend_class(name: str) -> type[Runner]:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def candidate_paths(
    backend: str = "auto", precision: str = "auto", device: str = "cpu"
) -> list[tuple[str, str]]:
    """The (backend, precision) paths that ``auto`` may choose from on this machine.

    ``backend="auto"``: every backend of ``device``'s type; ``precision="auto"``: every precision
    of each that can run here. A named backend and precision are returned as they are after
    :meth:`Runner.check`, so an impossible request fails loudly instead of being skipped.
    """
    if precision != "auto" and precision not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {PRECISIONS}, got {precision!r}")
    if backend != "auto":
        cls = backend_class(backend)
        if precision != "auto":
            cls.check(precision)
            return [(backend, precision)]
        cls.check(cls.precisions[0])
        paths = [(backend, p) for p in cls.precisions if cls.unavailable(p) is None]
        return paths
    names = CUDA_BACKENDS if torch.device(device).type == "cuda" else CPU_BACKENDS
    paths = []
    for name in names:
        cls = BACKENDS[name]
        for p in cls.precisions if precision == "auto" else (precision,):
            if p in cls.precisions and cls.unavailable(p) is None:
                paths.append((name, p))
    if not paths:
        reasons = "; ".join(BACKENDS[n].unavailable(BACKENDS[n].precisions[0]) or n for n in names)
        raise BackendUnavailable(f"no {device} backend can run precision {precision!r} here: {reasons}")
    return paths


def runner_from_generator(
    generator: nn.Module,
    backend: str,
    precision: str = "fp32",
    workdir: str | Path | None = None,
    calibration: Sequence[np.ndarray] | None = None,
    threads: int | None = None,
) -> Runner:
    """Build ``backend`` at ``precision`` for an in-memory generator (files go to ``workdir``)."""
    return backend_class(backend).from_generator(generator, precision, workdir, calibration, threads)


def runner_from_export(
    model_dir: str | Path, backend: str, precision: str = "fp32", threads: int | None = None
) -> Runner:
    """Load ``backend`` at ``precision`` from an export directory (``ldct-best export``)."""
    return backend_class(backend).from_export(model_dir, precision, threads)
