"""Architecture registry: ``model.arch`` name -> builder (docs/DESIGN.md, one file per architecture).

Everything that builds or rebuilds a generator (the engine, checkpoints, the registered model,
export, validate, denoise) calls :func:`build_model`, so a new architecture is one file in this
package plus one entry in :data:`ARCHITECTURES`. A builder takes the run's ``ModelConfig`` and
``HUNormalization`` and returns an ``nn.Module`` mapping unit [N,1,H,W] -> [N,1,H,W].
The architecture modules import only ``ldct.config`` and ``ldct.models.standardize`` (never this
package's names), and the encoder-decoder imports timm only when it builds one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from ldct.models.generator import build_generator
from ldct.models.redcnn import build_redcnn

DEFAULT_ARCH = "encoder_decoder"


def _encoder_decoder(model_cfg: Any, normalization: Any) -> nn.Module:
    return build_generator(model_cfg, normalization)


def _redcnn(model_cfg: Any, normalization: Any) -> nn.Module:
    return build_redcnn(model_cfg, normalization)


# name -> (builder, one line for `--help`-style listings and error messages)
ARCHITECTURES: dict[str, tuple[Callable[[Any, Any], nn.Module], str]] = {
    DEFAULT_ARCH: (_encoder_decoder, "timm encoder (model.encoder) + top-down decoder, residual output"),
    "redcnn": (_redcnn, "RED-CNN (Chen et al. 2017): 5 conv + 5 deconv, 5x5, residual shortcuts"),
}


def architectures() -> list[str]:
    """The registered ``model.arch`` names."""
    return sorted(ARCHITECTURES)


def build_model(model_cfg: Any, normalization: Any = None) -> nn.Module:
    """The generator ``model_cfg.arch`` names (a missing ``arch`` means the default)."""
    arch = getattr(model_cfg, "arch", DEFAULT_ARCH)
    if arch not in ARCHITECTURES:
        raise ValueError(f"model.arch {arch!r} is not registered; choose one of {architectures()}")
    model = ARCHITECTURES[arch][0](model_cfg, normalization)
    # Recorded on the module so the model card / export can name it without the config.
    model.arch = arch
    return model
