"""RED-CNN (Chen et al., "Low-dose CT with a residual encoder-decoder convolutional neural
network", IEEE TMI 2017): the learned baseline of the study, trained with λ_adv = 0 (no critic).

Five 5x5 convolutions without padding (each shrinks H, W by 4) and five 5x5 transposed
convolutions (each grows them back by 4), ``channels`` (96 in the paper) wide, ReLU after each,
and three residual shortcuts as in the paper: input -> after the last deconv, conv2's output ->
after deconv3, conv4's output -> after deconv1. For a [N,1,64,64] patch:

    x [N,1,64,64] --conv1--> [N,96,60,60] --conv2--> 56 (kept) --conv3--> 52 --conv4--> 48 (kept)
      --conv5--> 44 --deconv1--> 48 (+conv4) --deconv2--> 52 --deconv3--> 56 (+conv2)
      --deconv4--> 60 --deconv5--> [N,1,64,64] (+x), ReLU

Any H, W >= 21 works (no padding to a multiple: ``pad_multiple`` = 1). Two choices of this
project, not the paper's: the network sees the project's CT-scaled input (``Standardize``, the
same as the default generator's) and the outer shortcut is added in those units; and the last
deconvolution starts at zero, so an untrained RED-CNN is the identity (the LDCT baseline), as the
default generator is. The paper trains with MSE; here the engine's pixel loss (L1) is used, so
the two architectures differ only in the network.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldct.config import HUNormalization
from ldct.models.standardize import Standardize

KERNEL = 5
LAYERS = 5  # per side: 5 conv + 5 deconv = the paper's 10 layers
MIN_SIZE = LAYERS * (KERNEL - 1) + 1


class REDCNN(nn.Module):
    """``forward(x)``: [N,1,H,W] in [0,1] -> the same, ``x`` plus a learned residual, ReLU'd."""

    pad_multiple = 1
    # Smallest H, W of the exported graph: at MIN_SIZE the bottleneck is 1 px, which torch.export
    # specialises (a size-1 dimension broadcasts), so the dynamic range starts one above.
    export_min_size = MIN_SIZE + 1

    def __init__(self, channels: int = 96, normalization: HUNormalization | None = None) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"RED-CNN channels must be >= 1, got {channels}")
        self.standardize = Standardize(normalization)
        c = int(channels)
        self.convs = nn.ModuleList(nn.Conv2d(1 if i == 0 else c, c, KERNEL) for i in range(LAYERS))
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(c, 1 if i == LAYERS - 1 else c, KERNEL) for i in range(LAYERS)
        )
        nn.init.zeros_(self.deconvs[-1].weight)
        nn.init.zeros_(self.deconvs[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"RED-CNN expects [N,1,H,W], got {tuple(x.shape)}")
        if x.shape[-1] < MIN_SIZE or x.shape[-2] < MIN_SIZE:
            raise ValueError(
                f"RED-CNN needs H, W >= {MIN_SIZE} (five unpadded 5x5 convs), got {tuple(x.shape)}"
            )
        z = self.standardize(x)
        c1 = F.relu(self.convs[0](z))
        c2 = F.relu(self.convs[1](c1))
        c3 = F.relu(self.convs[2](c2))
        c4 = F.relu(self.convs[3](c3))
        c5 = F.relu(self.convs[4](c4))
        d1 = F.relu(self.deconvs[0](c5) + c4)
        d2 = F.relu(self.deconvs[1](d1))
        d3 = F.relu(self.deconvs[2](d2) + c2)
        d4 = F.relu(self.deconvs[3](d3))
        out_z = self.deconvs[4](d4) + z
        # Back to [0,1] units; the paper's final ReLU (non-negative output) is kept.
        return F.relu(out_z * self.standardize.scale + self.standardize.center)


def build_redcnn(model_cfg: Any, normalization: HUNormalization | None = None) -> REDCNN:
    """RED-CNN from a ``ModelConfig`` (``redcnn_channels``) and the run's HU normalisation."""
    return REDCNN(channels=int(getattr(model_cfg, "redcnn_channels", 96)), normalization=normalization)
