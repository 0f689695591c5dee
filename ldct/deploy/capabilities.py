"""What this machine can do: CPU model and feature flags, device names, library versions.

Read from the machine, never assumed: the runners refuse a reduced precision the CPU would only
emulate, and every FPS figure is tagged with the device and libraries that produced it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo (Linux), else platform.processor()."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_capabilities() -> dict[str, Any]:
    """What matters for reduced precision on this CPU, read from the CPU, never assumed.

    ``native_bf16``: bf16 dot products in hardware (AVX512_BF16 on Zen 4 / Cooper Lake, AMX on
    Sapphire Rapids); without it bf16 is emulated. ``vnni``: int8 dot products (AVX512_VNNI or
    AVX-VNNI). ``openvino``: the OpenVINO CPU plugin's own OPTIMIZATION_CAPABILITIES.
    """
    flags = cpu_flags()
    caps: dict[str, Any] = {
        "cpu": cpu_name(),
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
    """One line for a log: the CPU, its bf16/int8 flags and OpenVINO's view of it."""
    keys = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    have = ", ".join(f"{k} {'yes' if caps[k] else 'no'}" for k in keys)
    ov = ",".join(caps["openvino"]) if caps.get("openvino") else "not available"
    return f"{caps['cpu']}: {have}; native bf16 {'yes' if caps['native_bf16'] else 'no'}; OpenVINO CPU: {ov}"


def _cpu_device_name(threads: int | None) -> str:
    return f"{cpu_name()} ({threads or torch.get_num_threads()} threads of {os.cpu_count()} CPUs)"


def _cuda_device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"


@functools.lru_cache(maxsize=1)
def _ov_core() -> Any:
    # One Core per process: creating it loads every OpenVINO plugin.
    import openvino as ov

    return ov.Core()


def library_versions(*names: str) -> dict[str, str | None]:
    """``{"torch_version": ..., "<name>_version": ...}`` for the libraries a path used."""
    out: dict[str, str | None] = {"torch_version": torch.__version__}
    for name in names:
        try:
            out[f"{name.replace('-', '_')}_version"] = version(name)
        except PackageNotFoundError:
            out[f"{name.replace('-', '_')}_version"] = None
    return out
