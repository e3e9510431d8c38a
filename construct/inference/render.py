"""Colour renderings of class masks with the project palette (method.md §1)."""

from __future__ import annotations

import numpy as np

from construct.constants import PALETTE

_COLOURS = np.array(PALETTE, dtype=np.uint8)


def colorize(mask: np.ndarray) -> np.ndarray:
    """H×W class indices 0–4 → H×W×3 uint8 palette colours."""
    return _COLOURS[mask]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``image`` (H×W×3 uint8) blended with the palette colours of ``mask``; ``alpha`` = colour weight."""
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize(mask).astype(np.float32)
    return np.rint(blended).astype(np.uint8)
