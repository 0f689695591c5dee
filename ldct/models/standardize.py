"""Input standardisation shared by the generator and the critic, derived from the HU normalisation.

The networks receive HU mapped onto [0, 1] by the configured :class:`HUNormalization`. Inside
them the input is re-expressed in CT terms: ``z = (HU - 0) / 204.8``, so soft tissue sits near 0,
air and bone near -5/+5, and quarter-dose noise (20-40 HU) has amplitude ~0.15 instead of ~0.007
in the default [-1024, 3072] range. With the raw [0, 1] input the features carry the noise so
faintly that the zero-initialised output conv needs ~10x more Adam steps to pick it up; for the
critic, whose gradient penalty is measured in these units, a 1-Lipschitz function of the raw
input could hardly tell noise levels apart.

The two constants are buffers, saved in every state_dict, so a checkpoint, an exported model and
``denoise`` keep the standardisation the network was trained with whatever ``data.hu_range`` is.
204.8 HU (= 0.05 x 4096) keeps the default normalisation bit-identical to the earlier hard-coded
``(x - 0.25) / 0.05``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ldct.config import HUNormalization

CENTER_HU = 0.0
SCALE_HU = 204.8


def standardization_constants(normalization: HUNormalization | None = None) -> tuple[float, float]:
    """(center, scale) in the network's [0, 1] units for ``normalization`` (default: [-1024, 3072])."""
    norm = normalization or HUNormalization()
    span = float(norm.hu_max) - float(norm.hu_min)
    if not span > 0:
        raise ValueError(f"HU normalisation needs hu_max > hu_min, got {norm}")
    return (CENTER_HU - float(norm.hu_min)) / span, SCALE_HU / span


class Standardize(nn.Module):
    """``z = (x - center) / scale`` with ``center``/``scale`` as persistent scalar buffers.

    ``legacy``: the (center, scale) a state_dict written before these buffers existed was trained
    with; such a state_dict loads with those values instead of failing on missing keys.
    """

    def __init__(
        self, normalization: HUNormalization | None = None, legacy: tuple[float, float] = (0.0, 1.0)
    ) -> None:
        super().__init__()
        center, scale = standardization_constants(normalization)
        self.register_buffer("center", torch.tensor(center, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.legacy = legacy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.center) / self.scale

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        for name, value in zip(("center", "scale"), self.legacy, strict=True):
            state_dict.setdefault(prefix + name, torch.tensor(value, dtype=torch.float32))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
