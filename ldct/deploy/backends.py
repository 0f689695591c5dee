"""Inference runners behind one small interface: torch, onnxruntime, OpenVINO and the CUDA paths.

A runner maps a float32 batch ``unit [N,1,H,W]`` in [0, 1] to the generator's output (same shape,
numpy) on one backend at one precision. ``validate`` times and gates runners, ``export`` checks
its files with them, ``denoise`` runs them; adding a backend is one :class:`Runner` subclass in
:data:`BACKENDS`.

This module is the registry and the import point for all of it. Below it: the interface
(:mod:`ldct.deploy.runner`), one module per runtime (``torch_runner``, ``onnxruntime_runner``,
``openvino_runner``), what this machine can do (:mod:`ldct.deploy.capabilities`) and the files
the runners load (:mod:`ldct.deploy.convert`).

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

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ldct.deploy.capabilities import (
    _cpu_device_name,
    cpu_capabilities,
    cpu_flags,
    format_capabilities,
    library_versions,
)
from ldct.deploy.convert import INPUT_NAME, ONNX_FILE, OPENVINO_FILE, TORCHSCRIPT_FILE
from ldct.deploy.onnxruntime_runner import OnnxRuntimeCudaRunner, OnnxRuntimeRunner, TensorRTRunner
from ldct.deploy.openvino_runner import OpenVINORunner
from ldct.deploy.runner import RUNNER_PRECISIONS, BackendUnavailable, Runner
from ldct.deploy.torch_runner import TorchCudaRunner, TorchRunner

__all__ = [
    "BACKENDS",
    "CPU_BACKENDS",
    "CUDA_BACKENDS",
    "INPUT_NAME",
    "ONNX_FILE",
    "OPENVINO_FILE",
    "PRECISIONS",
    "TORCHSCRIPT_FILE",
    "BackendUnavailable",
    "OnnxRuntimeCudaRunner",
    "OnnxRuntimeRunner",
    "OpenVINORunner",
    "Runner",
    "TensorRTRunner",
    "TorchCudaRunner",
    "TorchRunner",
    "_cpu_device_name",
    "backend_class",
    "candidate_paths",
    "cpu_capabilities",
    "cpu_flags",
    "format_capabilities",
    "library_versions",
    "runner_from_export",
    "runner_from_generator",
]

# The name callers of this module know; what it holds is the runners' precisions.
PRECISIONS = RUNNER_PRECISIONS


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
    if precision != "auto" and precision not in RUNNER_PRECISIONS:
        raise ValueError(f"precision must be auto or one of {RUNNER_PRECISIONS}, got {precision!r}")
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
