"""A small stand-in generator for the deploy tests (the real one lives in ldct.models.generator).

It keeps the contract of the real Generator: [N,1,H,W] in [0,1] -> x + residual, any H,W by
padding to the network's stride and cropping back, so the export code meets the same padding
arithmetic (symbolic H,W) that the real model produces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyGenerator(nn.Module):
    """Pads to a multiple of 8, three strided/unstrided convs, crops back, adds the residual."""

    pad_multiple = 8

    def __init__(self, width: int = 8, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.down = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.up = nn.Conv2d(width, 1, 3, padding=1)
        # Deterministic, non-trivial weights, small enough that the residual stays modest.
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # [N,1,H,W] -> [N,1,H+ph,W+pw], both multiples of the stride
        ph = (self.pad_multiple - h % self.pad_multiple) % self.pad_multiple
        pw = (self.pad_multiple - w % self.pad_multiple) % self.pad_multiple
        padded = F.pad(x, (0, pw, 0, ph), mode="reflect")
        feats = self.down(padded)  # [N,C,(H+ph)/8,(W+pw)/8]
        up = F.interpolate(feats, scale_factor=float(self.pad_multiple), mode="bilinear", align_corners=False)
        residual = 0.05 * torch.tanh(self.up(up))[..., :h, :w]
        return x + residual
