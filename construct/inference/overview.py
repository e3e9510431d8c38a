"""One-picture summary of a predicted slide: thumbnail, mask overlay, and a legend with class shares."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from construct.classes import ClassSet
from construct.inference.render import overlay

_GAP = 12
_FONT_SIZE = 16


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans from matplotlib (a requirement; it has µ and ²), else Pillow's built-in font."""
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.__file__).parent / "mpl-data/fonts/ttf/DejaVuSans.ttf"), _FONT_SIZE)
    except (ImportError, OSError):
        return ImageFont.load_default(_FONT_SIZE)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Class indices resized to ``size`` (w, h) by nearest neighbour."""
    return np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))


def draw_overview(thumbnail: np.ndarray, mask: np.ndarray, shares: Sequence[float | None], title: str,
                  classes: ClassSet) -> np.ndarray:
    """H×W×3 uint8: ``title``, the thumbnail and its mask overlay side by side, and a legend.

    ``mask`` is any resolution of the slide's mask (resized to the thumbnail); ``shares`` gives
    each class's share of the tissue (the classes, then background), None where it is not known.
    """
    height, width = thumbnail.shape[:2]
    mask = resize_mask(mask, (width, height))
    font = _font()
    line = _FONT_SIZE + 8
    labels = [name if share is None else f"{name} {100 * share:.1f}%" for name, share in zip(classes.all_names, shares)]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [_FONT_SIZE + 6 + int(measure.textlength(label, font=font)) + 2 * _GAP for label in labels]
    total_width = 2 * width + 3 * _GAP
    rows, used = 1, _GAP
    for item in widths:  # wrap the legend where it would leave the picture
        if used + item > total_width and used > _GAP:
            rows, used = rows + 1, _GAP
        used += item
    canvas = Image.new("RGB", (total_width, height + (1 + rows) * line + 3 * _GAP), "white")
    canvas.paste(Image.fromarray(thumbnail), (_GAP, line + _GAP))
    canvas.paste(Image.fromarray(overlay(thumbnail, mask, classes)), (2 * _GAP + width, line + _GAP))
    draw = ImageDraw.Draw(canvas)
    draw.text((_GAP, _GAP // 2), title, fill="black", font=font)
    x, y = _GAP, height + line + 2 * _GAP
    for colour, label, item in zip(classes.palette, labels, widths):
        if x + item > total_width and x > _GAP:
            x, y = _GAP, y + line
        draw.rectangle((x, y + 2, x + _FONT_SIZE, y + 2 + _FONT_SIZE), fill=tuple(colour), outline="black")
        draw.text((x + _FONT_SIZE + 6, y), label, fill="black", font=font)
        x += item
    return np.asarray(canvas)
