"""Residual bottleneck adapters that refine the frozen CONCH features (method.md §4)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class ResidualAdapter(nn.Module):
    """x + f(x) with f = 1x1 conv → BN → GELU → 3x3 depthwise → BN → GELU → 1x1 conv.

    The last convolution starts at zero, so a new adapter is the identity and training starts
    from CONCH's own features.
    """

    def __init__(self, channels: int, padding: Literal["reflect", "zeros"] = "reflect") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 1),
            nn.BatchNorm2d(channels),
            nn.GELU(),
            # Reflect padding by default: zero padding (the released code's) lets learned, asymmetric
            # kernels mark the tile border, which shows up as CAM activation along the edges.
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, padding_mode=padding),
            nn.BatchNorm2d(channels),
            nn.GELU(),
            nn.Conv2d(channels, channels, 1),
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)
