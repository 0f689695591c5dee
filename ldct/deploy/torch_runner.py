"""PyTorch runners: eager (from a generator) or TorchScript (from an export), CPU and CUDA."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ldct.deploy.capabilities import cpu_capabilities, cpu_name
from ldct.deploy.convert import TORCHSCRIPT_FILE
from ldct.deploy.runner import Runner


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
                f"torch bf16 on {cpu_name()}: no native bf16 (neither AVX512_BF16 nor AMX); "
                "emulated bf16 is slower than fp32. Use fp32 or another backend."
            )
        return reason

    @classmethod
    def from_generator(
        cls,
        generator: nn.Module,
        precision: str = "fp32",
        workdir: str | Path | None = None,
        calibration: Sequence[np.ndarray] | None = None,
        threads: int | None = None,
    ) -> TorchRunner:
        cls.check(precision)
        net = copy.deepcopy(getattr(generator, "module", generator)).float().to(cls.device_type).eval()
        return cls(net, precision, threads)

    @classmethod
    def from_export(
        cls, model_dir: str | Path, precision: str = "fp32", threads: int | None = None
    ) -> TorchRunner:
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
