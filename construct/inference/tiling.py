"""Inference on images of any size: the training tile as one batch, larger images by a sliding
window of overlapping tiles with averaged CAMs, smaller ones upsampled to the tile first."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from construct.config import Config
from construct.errors import ConfigError, DataError

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Maps an N×3×tile×tile batch to (N×C×h×w CAMs, N×C logits)."""


def window_stride(config: Config) -> int:
    """The sliding-window stride: ``inference.tile_stride``, or half the tile when it is null."""
    return config.inference.tile_stride or config.model.image_size // 2


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Window offsets every ``stride`` pixels; the last window sits flush with the far border (no padding)."""
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def check_tileable(height: int, width: int, tile: int, name: str) -> None:
    """DataError when an image is smaller than one tile in either side."""
    if height < tile or width < tile:
        raise DataError(f"{name}: image is {width}×{height} px, smaller than the {tile}×{tile} px tile the model "
                        f"was trained on; inputs must be at least {tile} px in each side")


def tiled_forward(forward: Forward, image: torch.Tensor, tile: int, stride: int, batch_size: int,
                  name: str = "image") -> tuple[torch.Tensor, torch.Tensor]:
    """CAMs of a 3×H×W image at pixel resolution (1×C×H×W) and its logits (1×C, mean over tiles).

    Each tile's CAMs are upsampled to the tile's pixels and summed into a canvas with a count map,
    so overlapping windows are averaged wherever they meet.
    """
    if not 0 < stride <= tile:
        raise ConfigError(f"inference.tile_stride {stride} must lie in 1..model.image_size ({tile}) or tiles leave gaps")
    height, width = image.shape[-2:]
    check_tileable(height, width, tile, name)
    windows = [(y, x) for y in tile_starts(height, tile, stride) for x in tile_starts(width, tile, stride)]
    canvas = count = logits_sum = None
    for first in range(0, len(windows), batch_size):
        chunk = windows[first:first + batch_size]
        crops = torch.stack([image[:, y:y + tile, x:x + tile] for y, x in chunk])
        cams, logits = forward(crops)
        cams = F.interpolate(cams.float(), size=(tile, tile), mode="bilinear", align_corners=False)
        if canvas is None:
            canvas = cams.new_zeros((cams.shape[1], height, width))
            count = cams.new_zeros((1, height, width))
            logits_sum = logits.new_zeros(logits.shape[1:], dtype=torch.float32)
        for (y, x), tile_cams in zip(chunk, cams):
            canvas[:, y:y + tile, x:x + tile] += tile_cams
            count[:, y:y + tile, x:x + tile] += 1
        logits_sum += logits.float().sum(dim=0)
    return (canvas / count)[None], (logits_sum / len(windows))[None]


def forward_any_size(forward: Forward, images: torch.Tensor, tile: int, stride: int, batch_size: int,
                     names: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CAMs (B×C×h×w) and logits (B×C) of a batch of same-size B×3×H×W images, whatever H and W.

    Tile-sized images run as one batch (CAMs on the CAM grid). Larger ones go through
    :func:`tiled_forward` (CAMs at pixel resolution). An image smaller than the tile in a side is
    first upsampled (bilinear) until that side is the tile, then treated alike; its CAMs come at the
    upsampled size. Callers resize CAMs to the image anyway, so each image is scored at its own size.
    """
    height, width = images.shape[-2:]
    if (height, width) == (tile, tile):
        return forward(images)
    if min(height, width) < tile:
        scale = tile / min(height, width)
        size = (max(tile, math.ceil(height * scale - 1e-6)), max(tile, math.ceil(width * scale - 1e-6)))
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
        if size == (tile, tile):
            return forward(images)
    outputs = [tiled_forward(forward, image, tile, stride, batch_size, name=names[i] if names else f"image {i}")
               for i, image in enumerate(images)]
    return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])
