"""Tissue detection on a slide thumbnail, so tiles and CRF windows on bare glass are skipped.

Glass is bright and grey; H&E-stained tissue is coloured. A thumbnail pixel is tissue when its
HSV saturation (after a 3×3 median, which removes dust and JPEG speckle) reaches a threshold; a
3×3 closing then fills pinholes. Queries come in level-0 pixels and are answered from the
thumbnail: :meth:`TissueMask.any_in` for a box, :meth:`TissueMask.sample` for a bilinearly
interpolated per-pixel mask (smooth contours, not thumbnail-sized steps).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter

MAX_THUMBNAIL_SIDE = 4096
"""Thumbnails never exceed this (very large slides get a coarser one), so the mask's memory is bounded."""


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an H×W×3 uint8 image (0 for black)."""
    rgb = rgb.astype(np.float32)
    high = rgb.max(axis=2)
    return np.where(high > 0, (high - rgb.min(axis=2)) / np.maximum(high, 1.0), 0.0)


def detect_tissue(thumbnail: np.ndarray, min_saturation: float) -> np.ndarray:
    """H×W bool tissue mask of an H×W×3 uint8 thumbnail."""
    sat = Image.fromarray(np.rint(saturation(thumbnail) * 255).astype(np.uint8))
    tissue = np.asarray(sat.filter(ImageFilter.MedianFilter(3))) >= min_saturation * 255
    closed = Image.fromarray(tissue.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.MinFilter(3))
    return np.asarray(closed) > 0


class TissueMask:
    """A thumbnail tissue mask with queries in level-0 pixel coordinates of a ``size`` (w, h) image."""

    def __init__(self, mask: np.ndarray, size: tuple[int, int]) -> None:
        self.mask = mask
        self.size = size
        self.scale_x = size[0] / mask.shape[1]  # level-0 px per thumbnail px
        self.scale_y = size[1] / mask.shape[0]
        self._float = mask.astype(np.float32)

    @classmethod
    def everywhere(cls, size: tuple[int, int]) -> TissueMask:
        """All tissue: for regions cut from tissue, where nothing should be skipped."""
        return cls(np.ones((1, 1), bool), size)

    @property
    def fraction(self) -> float:
        """Share of the thumbnail that is tissue."""
        return float(self.mask.mean())

    def any_in(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        """Whether the level-0 box [x0, x1) × [y0, y1) touches a tissue thumbnail pixel."""
        height, width = self.mask.shape
        left, right = max(0, math.floor(x0 / self.scale_x)), min(width, math.ceil(x1 / self.scale_x))
        top, bottom = max(0, math.floor(y0 / self.scale_y)), min(height, math.ceil(y1 / self.scale_y))
        return left < right and top < bottom and bool(self.mask[top:bottom, left:right].any())

    def sample(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """height×width bool: the mask interpolated bilinearly at level-0 pixel centres, ≥ 0.5 is tissue."""
        rows, row_weights = _bilinear_taps(np.arange(y0, y0 + height), self.scale_y, self.mask.shape[0])
        cols, col_weights = _bilinear_taps(np.arange(x0, x0 + width), self.scale_x, self.mask.shape[1])
        values = np.zeros((height, width), np.float32)
        for row_index, row_weight in zip(rows, row_weights):
            picked = self._float[row_index]
            for col_index, col_weight in zip(cols, col_weights):
                values += row_weight[:, None] * col_weight[None, :] * picked[:, col_index]
        return values >= 0.5


def _bilinear_taps(pixels: np.ndarray, scale: float, length: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Source indices and weights (two taps) of bilinear sampling at pixel centres, edges clamped."""
    source = (pixels + 0.5) / scale - 0.5
    low = np.floor(source)
    weight_high = (source - low).astype(np.float32)
    low = low.astype(np.int64)
    return ([np.clip(low, 0, length - 1), np.clip(low + 1, 0, length - 1)], [1.0 - weight_high, weight_high])
