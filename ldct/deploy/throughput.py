"""Throughput of a generator at 512x512: the figure that gates promotion (docs/DESIGN.md §5).

The paper's bar is 12.5 FPS on a T4 (CUDA, fp16). A CPU has no comparable published figure, so
on CPU the caller must name the bar explicitly (:func:`default_min_fps` returns None there).
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ldct.deploy.capabilities import cpu_name

PAPER_MIN_FPS_CUDA = 12.5
# What measure_fps's ``precision`` accepts: eager autocast choices plus "auto". Not the runners'
# precisions (ldct.deploy.runner.RUNNER_PRECISIONS): no int8 here, and "auto" is a choice.
MEASURE_FPS_PRECISIONS = ("auto", "fp32", "fp16", "bf16")
PRECISIONS = MEASURE_FPS_PRECISIONS  # the old name


def default_min_fps(device: str) -> float | None:
    """The paper's bar for CUDA devices (12.5 FPS, T4); None on CPU, where the caller must choose."""
    return PAPER_MIN_FPS_CUDA if torch.device(device).type == "cuda" else None


def resolve_min_fps(device: str, min_fps: float | None = None) -> float:
    """``min_fps`` if given, else the device default; a CPU without an explicit bar is an error."""
    if min_fps is not None:
        return float(min_fps)
    default = default_min_fps(device)
    if default is None:
        raise ValueError(
            f"no default FPS bar for device {device!r}: the paper's 12.5 FPS is a T4 (CUDA) figure. "
            "Pass the bar explicitly (e.g. --min-fps 1.0) when validating on a CPU."
        )
    return default


def check_bar(result: dict[str, Any], min_fps: float | None) -> bool:
    """True when the best measured FPS meets ``min_fps``."""
    if min_fps is None:
        raise ValueError("check_bar needs an explicit min_fps (see default_min_fps / resolve_min_fps)")
    return float(result["fps"]) >= float(min_fps)


def device_name(device: str | torch.device) -> str:
    """Human-readable device: the CUDA product name, or the CPU model with torch's thread count."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{cpu_name()} ({torch.get_num_threads()} threads of {os.cpu_count()} CPUs)"


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"torch_version": torch.__version__, "onnxruntime_version": None}
    with contextlib.suppress(ImportError):
        import onnxruntime

        versions["onnxruntime_version"] = onnxruntime.__version__
    return versions


def _resolve_precision(precision: str, device_type: str) -> str:
    if precision not in MEASURE_FPS_PRECISIONS:
        raise ValueError(f"precision must be one of {MEASURE_FPS_PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "fp16" if device_type == "cuda" else "fp32"
    if precision == "fp16" and device_type != "cuda":
        raise ValueError("fp16 autocast is measured on CUDA only; use precision='fp32' or 'bf16' on CPU")
    return precision


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_batch(
    net: nn.Module, x: torch.Tensor, dev: torch.device, warmup: int, repeats: int
) -> dict[str, Any]:
    """``warmup`` untimed calls of ``net(x)``, then ``repeats`` timed ones (synchronized on CUDA)."""
    for _ in range(warmup):
        net(x)
    _sync(dev)
    seconds = []
    for _ in range(repeats):
        _sync(dev)
        start = time.perf_counter()
        net(x)
        _sync(dev)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"fps": x.shape[0] / median, "median_s": median, "seconds": seconds}


def measure_fps(
    model: nn.Module,
    device: str = "cpu",
    size: int = 512,
    batch_sizes: Sequence[int] = (1, 4),
    warmup: int = 2,
    repeats: int = 5,
    precision: str = "auto",
) -> dict[str, Any]:
    """Frames per second of ``model`` on ``size`` x ``size`` single-channel images.

    Measures a copy of the model (the caller's module keeps its device, mode and memory format)
    in eval mode under ``torch.inference_mode``. On CUDA: fp16 autocast ("auto"), channels_last,
    cudnn.benchmark, and a synchronize around each timed call. On CPU: fp32 ("auto"), torch's
    thread count left as it is. For each batch size: ``warmup`` untimed calls, then ``repeats``
    timed calls; FPS = batch / median seconds. ``fps`` is the best over batch sizes.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {tuple(batch_sizes)}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this machine")
    prec = _resolve_precision(precision, dev.type)
    channels_last = dev.type == "cuda"

    # Unwrap DDP/compiled wrappers only by what they expose; copy so the caller's model is untouched.
    net = copy.deepcopy(getattr(model, "module", model)).to(dev).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    autocast: contextlib.AbstractContextManager = contextlib.nullcontext()
    if prec in ("fp16", "bf16"):
        dtype = torch.float16 if prec == "fp16" else torch.bfloat16
        autocast = torch.autocast(device_type=dev.type, dtype=dtype)

    old_benchmark = torch.backends.cudnn.benchmark
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    gen = torch.Generator().manual_seed(0)
    per_batch: dict[str, dict[str, Any]] = {}
    try:
        with torch.inference_mode(), autocast:
            for batch in (int(b) for b in batch_sizes):
                x = torch.rand(batch, 1, size, size, generator=gen).to(dev)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                per_batch[str(batch)] = _time_batch(net, x, dev, warmup, repeats)
    finally:
        torch.backends.cudnn.benchmark = old_benchmark

    best = max(per_batch, key=lambda b: per_batch[b]["fps"])
    return {
        "fps": per_batch[best]["fps"],
        "batch": int(best),
        "median_s": per_batch[best]["median_s"],
        "per_batch": per_batch,
        "size": size,
        "device": str(dev),
        "device_name": device_name(dev),
        "threads": torch.get_num_threads(),
        "precision": prec,
        "channels_last": channels_last,
        "cudnn_benchmark": dev.type == "cuda",
        "warmup": warmup,
        "repeats": repeats,
        # CPU figures depend on what else runs: with libgomp's default (spinning) wait policy a
        # second busy process on a 2-core machine made eager PyTorch ~10x slower here.
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        **library_versions(),
    }


def measure_runner(
    runner: Any,
    size: int = 512,
    batch_sizes: Sequence[int] = (1, 4),
    warmup: int = 2,
    repeats: int = 5,
) -> dict[str, Any]:
    """Latency and throughput of a :class:`ldct.deploy.backends.Runner` on ``size``² images.

    The paper's figure (0.08 s per 512x512 image) is a latency, so the gate figure ``fps`` is
    batch 1 (1 / median seconds); ``batched_fps`` is the best over the larger batches, reported
    beside it and never used to pass the bar. A runner returns numpy, so every timed call
    includes the copy back to the host (and hence a CUDA synchronize).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    batches = sorted({1, *(int(b) for b in batch_sizes)})
    if batches[0] < 1:
        raise ValueError(f"batch_sizes must be positive integers, got {tuple(batch_sizes)}")
    rng = np.random.default_rng(0)
    per_batch: dict[str, dict[str, Any]] = {}
    for batch in batches:
        x = rng.random((batch, 1, size, size), dtype=np.float32)
        for _ in range(warmup):
            runner(x)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner(x)
            seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds)
        per_batch[str(batch)] = {"fps": batch / median, "median_s": median, "seconds": seconds}
    larger = [b for b in per_batch if b != "1"] or ["1"]
    best = max(larger, key=lambda b: per_batch[b]["fps"])
    return {
        **runner.describe(),
        "fps": per_batch["1"]["fps"],
        "batch": 1,
        "latency_ms": 1000.0 * per_batch["1"]["median_s"],
        "batched_fps": per_batch[best]["fps"],
        "batched_batch": int(best),
        "per_batch": per_batch,
        "size": size,
        "warmup": warmup,
        "repeats": repeats,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
