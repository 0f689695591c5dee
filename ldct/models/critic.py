"""WGAN-GP critic: strided convolutions, LeakyReLU, global average pooling, one linear score.

The input is first standardised like the generator's (``ldct.models.standardize``: HU / 204.8
around 0 HU), and ``score_standardized`` is what the gradient penalty differentiates, so the
1-Lipschitz constraint is measured in those CT units rather than in [0, 1] units where
quarter-dose noise is ~0.007. No normalisation layers: batch norm couples the samples of a batch, and the gradient penalty
is defined per sample (Gulrajani et al. 2017). Global average pooling makes it size agnostic;
three stride-2 stages need a patch of at least 16x16 (shapes for a 64x64 patch, C = channels):

    [N,1,64,64] -> [N,C,64,64] -> [N,C,32,32] -> [N,2C,32,32] -> [N,2C,16,16]
                -> [N,4C,16,16] -> [N,4C,8,8] -> mean over H,W [N,4C] -> linear -> [N]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ldct.config import HUNormalization
from ldct.models.standardize import Standardize

MIN_SIZE = 16


class Critic(nn.Module):
    """Scores [N,1,H,W] images in [0,1] with one unbounded real number each ([N])."""

    def __init__(self, channels: int = 64, normalization: HUNormalization | None = None) -> None:
        super().__init__()
        # A state_dict from before the standardisation loads as the identity it was trained with.
        self.standardize = Standardize(normalization, legacy=(0.0, 1.0))
        if channels < 1:
            raise ValueError(f"critic channels must be >= 1, got {channels}")
        c = channels
        # (in, out, stride) as in WGAN-VGG's discriminator: pairs of stride 1 and stride 2 convs.
        plan = [(1, c, 1), (c, c, 2), (c, 2 * c, 1), (2 * c, 2 * c, 2), (2 * c, 4 * c, 1), (4 * c, 4 * c, 2)]
        layers: list[nn.Module] = []
        # Not in-place: the penalty differentiates through these activations twice.
        for cin, cout, stride in plan:
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.score = nn.Linear(4 * c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_standardized(self.standardize(x))

    def score_standardized(self, z: torch.Tensor) -> torch.Tensor:
        """Scores of already standardised images ``z`` [N,1,H,W] -> [N] (the penalty's input space)."""
        if z.ndim != 4 or z.shape[1] != 1:
            raise ValueError(f"Critic expects [N,1,H,W], got {tuple(z.shape)}")
        if min(z.shape[-2:]) < MIN_SIZE:
            raise ValueError(
                f"Critic needs patches of at least {MIN_SIZE}x{MIN_SIZE}, got {tuple(z.shape[-2:])}"
            )
        return self.score(self.features(z).mean(dim=(2, 3))).squeeze(1)


def build_critic(model_cfg: Any, normalization: HUNormalization | None = None) -> Critic:
    """Critic from a ``ModelConfig`` (critic_channels) and the run's HU normalisation."""
    return Critic(channels=model_cfg.critic_channels, normalization=normalization)
