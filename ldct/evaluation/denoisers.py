"""Denoisers as HU -> HU functions: a generator in memory, a checkpoint, or an export directory.

The model sees the normalised [0, 1] input and its output is clipped to [0, 1] before going back
to HU, as during validation (``ldct.training.engine.evaluate``). A registered model becomes one
through ``ldct.registry.load.load_denoiser``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ldct.config import HUNormalization
from ldct.deploy.export import load_exported, normalization_from_meta
from ldct.training.checkpoint import generator_from_state, load_state

Denoiser = Callable[[np.ndarray], np.ndarray]  # HU [H, W] float32 -> HU [H, W]


def torch_denoiser(
    generator: torch.nn.Module, normalization: HUNormalization, device: str | torch.device = "cpu"
) -> Denoiser:
    """HU -> HU through a generator that works on [0, 1] input (clipped output, as in validation)."""
    net = getattr(generator, "module", generator).to(device).eval()

    def run(hu: np.ndarray) -> np.ndarray:
        unit = normalization.to_unit(torch.from_numpy(np.asarray(hu, dtype=np.float32)))[None, None]
        with torch.inference_mode():
            out = net(unit.to(device)).float().clamp(0.0, 1.0).cpu()[0, 0]
        return normalization.to_hu(out).numpy()

    return run


def onnx_denoiser(model_dir: Path | str) -> tuple[Denoiser, str]:
    """HU -> HU through an export directory (``ldct-best export``) on onnxruntime."""
    exported = load_exported(model_dir, backend="onnxruntime")
    norm = normalization_from_meta(exported.card)

    def run(hu: np.ndarray) -> np.ndarray:
        unit = norm.to_unit(np.asarray(hu, dtype=np.float32))[None, None].astype(np.float32)
        return norm.to_hu(np.clip(exported(unit)[0, 0], 0.0, 1.0)).astype(np.float32)

    version = exported.card.get("version")
    return run, f"ONNX {Path(model_dir).name}" + (f" (v{version})" if version else "")


def checkpoint_denoiser(checkpoint: Path | str) -> tuple[Denoiser, str]:
    """HU -> HU through a training checkpoint (its own config rebuilds the generator)."""
    generator, cfg = generator_from_state(load_state(checkpoint))
    return torch_denoiser(generator, cfg.normalization), f"checkpoint {Path(checkpoint).name}"
