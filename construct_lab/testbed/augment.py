"""Stain and scale augmentation for pretraining, so that the towers do not learn one palette.

Pathology foundation models are trained on slides from many labs and scanners. Here that
variety is drawn: each image's optical densities (Beer–Lambert, OD = −log(I)) are mixed by a
random matrix near the identity and rescaled per channel, which shifts haematoxylin and eosin
hues and strengths independently, and brightness varies. (Scale is varied where crops are taken.)
"""

from __future__ import annotations

import torch


def stain_jitter(images: torch.Tensor, generator: torch.Generator, strength: float = 0.25) -> torch.Tensor:
    """B×3×H×W [0, 1] images with a random stain per image (optical-density space)."""
    batch = images.shape[0]
    od = -torch.log(images.clamp(1.0 / 255.0, 1.0))
    noise = torch.rand(batch, 3, 3, generator=generator) * 2 - 1
    mixing = torch.eye(3) + strength * 0.6 * noise
    gain = 1.0 + strength * (torch.rand(batch, 1, 3, generator=generator) * 2 - 1)
    mixed = torch.einsum("bchw,bcd->bdhw", od, mixing) * gain.view(batch, 3, 1, 1)
    brightness = 1.0 + 0.1 * (torch.rand(batch, 1, 1, 1, generator=generator) * 2 - 1)
    return (torch.exp(-mixed.clamp_min(0.0)) * brightness).clamp(0.0, 1.0)
