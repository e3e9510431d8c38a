"""Colour renderings of class masks with the dataset's palette."""

from __future__ import annotations

import numpy as np

from construct.classes import ClassSet


def colorize(mask: np.ndarray, classes: ClassSet) -> np.ndarray:
    """H×W internal class indices 0..C → H×W×3 uint8 palette colours."""
    return np.array(classes.palette, dtype=np.uint8)[mask]


def overlay(image: np.ndarray, mask: np.ndarray, classes: ClassSet, alpha: float = 0.5) -> np.ndarray:
    """``image`` (H×W×3 uint8) blended with the palette colours of ``mask``; ``alpha`` = colour weight."""
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize(mask, classes).astype(np.float32)
    return np.rint(blended).astype(np.uint8)
