"""Test-time augmentation: CAMs and logits averaged over horizontal flips × input scales (method.md §7)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from construct.errors import ConfigError
from construct.models.conch import PATCH_SIZE
from construct.models.construct import ConStructModel


def scaled_size(size: int, scale: float) -> int:
    """``size · scale`` rounded to the nearest multiple of the patch size (at least one patch)."""
    return max(PATCH_SIZE, round(size * scale / PATCH_SIZE) * PATCH_SIZE)


def tta_forward(model: ConStructModel, images: torch.Tensor, scales: Sequence[float],
                flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CAMs (B×C×h×w, on the CAM grid of the unscaled input) and mean logits (B×C).

    Each pass resizes the input bilinearly (scale ≠ 1), optionally mirrors it, and its CAMs are
    mirrored back and resized to the scale-1.0 grid. ``scales=[1.0], flip=False`` is one plain pass.
    """
    if 1.0 not in scales:
        raise ConfigError(f"inference.tta_scales {list(scales)} must include 1.0: CAMs are averaged on its grid")
    height, width = images.shape[-2:]
    cams_sum = logits_sum = None
    passes = 0
    # The unscaled pass goes first: its CAM grid is where every pass is averaged.
    for scale in sorted(scales, key=lambda s: s != 1.0):
        size = (scaled_size(height, scale), scaled_size(width, scale))
        scaled = images if scale == 1.0 else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            out = model(scaled.flip(-1) if mirrored else scaled)
            cams = out.cams.float().flip(-1) if mirrored else out.cams.float()
            if cams_sum is None:
                cams_sum, logits_sum = cams, out.logits.float()
            else:
                if cams.shape[-2:] != cams_sum.shape[-2:]:
                    cams = F.interpolate(cams, size=cams_sum.shape[-2:], mode="bilinear", align_corners=False)
                cams_sum, logits_sum = cams_sum + cams, logits_sum + out.logits.float()
            passes += 1
    return cams_sum / passes, logits_sum / passes
