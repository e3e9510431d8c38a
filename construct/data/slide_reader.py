"""Region readers for whole slides (OpenSlide) and in-memory images, resampled on request.

Both readers answer the same question: "the RGB pixels of this level-0 box, resampled to
``width × height``", so the streaming predictor can ask for tiles and CRF windows at the model's
resolution without caring where they come from. Outside the image, slides read as white glass;
in-memory regions (cut from tissue) are mirrored at their borders instead.

A slide's pixels are those of its frame: the scanned area that the file states with
``openslide.bounds-x/-y/-width/-height`` (MIRAX and other formats with empty margins), else the
whole level 0. This is the image QuPath displays (its OpenSlide server crops to the bounds), so
whatever is predicted in frame coordinates lies where QuPath shows it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from construct.errors import DataError

WHITE = 255


def require_slide_file(path: Path) -> None:
    """DataError unless ``path`` is a file: a folder (whatever its name ends in) says it is one."""
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a slide file; pass the slide files inside it (e.g. {path}/*.svs; "
                        "for MIRAX pass the .mrxs file beside its folder)")
    if not path.is_file():
        raise DataError(f"{path}: file not found")


class RegionReader(Protocol):
    """What the streaming predictor reads from: a level-0 pixel grid and its resolution."""

    name: str
    size: tuple[int, int]
    """Level-0 (width, height) in pixels of the image (of a slide: its frame)."""
    mpp: float | None
    """Level-0 microns per pixel; None when unknown."""

    def read(self, x: float, y: float, width: int, height: int, downsample: float) -> np.ndarray:
        """H×W×3 uint8: the level-0 box at (x, y) of ``width·downsample × height·downsample`` px,
        resampled to ``width × height``."""

    def thumbnail(self, max_side: int) -> np.ndarray:
        """The whole image as H×W×3 uint8, at most ``max_side`` px on its longer side."""

    def close(self) -> None:
        """Release the file."""


class ArrayReader:
    """An H×W×3 uint8 image held in memory (a PNG region). Reads are at level 0 only (downsample 1)."""

    def __init__(self, image: np.ndarray, name: str = "image", mpp: float | None = None) -> None:
        self.image = image
        self.name = name
        self.size = (image.shape[1], image.shape[0])
        self.mpp = mpp

    def read(self, x: float, y: float, width: int, height: int, downsample: float) -> np.ndarray:
        if downsample != 1.0 or x != int(x) or y != int(y):
            raise ValueError(f"{self.name}: in-memory images are read at whole pixels and downsample 1, "
                             f"got ({x}, {y}) at {downsample}")
        x, y = int(x), int(y)
        image_h, image_w = self.image.shape[:2]
        # Border pixels repeat mirrored (a region's edge cuts through tissue; glass would be a lie).
        rows = _mirror(np.arange(y, y + height), image_h)
        cols = _mirror(np.arange(x, x + width), image_w)
        if rows[0] == y and rows[-1] == y + height - 1 and cols[0] == x and cols[-1] == x + width - 1:
            return self.image[y:y + height, x:x + width]
        return self.image[np.ix_(rows, cols)]

    def thumbnail(self, max_side: int) -> np.ndarray:
        image = Image.fromarray(self.image)
        image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
        return np.asarray(image)

    def close(self) -> None:
        pass


def _mirror(index: np.ndarray, length: int) -> np.ndarray:
    """Indices reflected into 0..length-1 (edge pixel not repeated), for any overshoot."""
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    index = np.abs(index) % period
    return np.where(index >= length, period - index, index)


class OpenSlideReader:
    """A whole-slide file read through OpenSlide, in its frame, with the resolution from its properties or ``mpp``.

    :attr:`offset` is the frame's top left corner in the slide's level-0 pixels (the stated bounds,
    else (0, 0)) and :attr:`size` its size; reads and thumbnails take frame coordinates, and
    whatever lies outside the frame reads as white glass. ``mpp`` is used only when the file does
    not state ``openslide.mpp-x``; :attr:`mpp_source` says which applied. A file OpenSlide cannot
    open, or one without a resolution and no ``mpp``, raises DataError.
    """

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        import openslide  # imported here: only slide commands need the native library

        self.path = Path(path)
        self.name = self.path.stem
        require_slide_file(self.path)
        try:
            self.slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError as exc:
            raise DataError(f"{self.path}: not a slide OpenSlide can read ({exc}); expected a whole-slide file "
                            "such as .svs, .ndpi, .mrxs, .scn or a tiled pyramidal .tif") from None
        self.offset, self.size = _frame(self.slide.properties, self.slide.dimensions, openslide)
        self.cropped = self.size != self.slide.dimensions or self.offset != (0, 0)
        self.vendor = self.slide.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
        stated = _stated_mpp(self.slide.properties, openslide)
        if stated is None and mpp is None:
            self.slide.close()
            raise DataError(f"{self.path}: the slide does not state its resolution (no {openslide.PROPERTY_NAME_MPP_X} "
                            "property); pass --mpp MICRONS_PER_PIXEL")
        self.mpp = stated if stated is not None else mpp
        self.mpp_source = "slide properties" if stated is not None else "--mpp"

    def read(self, x: float, y: float, width: int, height: int, downsample: float) -> np.ndarray:
        level = self.slide.get_best_level_for_downsample(downsample)
        level_downsample = self.slide.level_downsamples[level]
        # The requested box in this level's pixels, then a whole-pixel box around it (1 px spare for the filter).
        box = (x / level_downsample, y / level_downsample, (x + width * downsample) / level_downsample,
               (y + height * downsample) / level_downsample)
        left, top = math.floor(box[0]) - 1, math.floor(box[1]) - 1
        right, bottom = math.ceil(box[2]) + 1, math.ceil(box[3]) + 1
        rgb = _on_white(self._read_region(left, top, level, (right - left, bottom - top)))
        inner = (box[0] - left, box[1] - top, box[2] - left, box[3] - top)
        if inner[2] - inner[0] == width and inner[3] - inner[1] == height and float(inner[0]).is_integer() \
                and float(inner[1]).is_integer():
            return np.array(rgb)[int(inner[1]):int(inner[1]) + height, int(inner[0]):int(inner[0]) + width]
        return np.array(rgb.resize((width, height), Image.Resampling.BILINEAR, box=inner))

    def thumbnail(self, max_side: int) -> np.ndarray:
        width, height = self.size
        level = self.slide.get_best_level_for_downsample(max(width, height) / max_side)
        level_downsample = self.slide.level_downsamples[level]
        size = ((math.ceil(width / level_downsample), math.ceil(height / level_downsample)) if self.cropped
                else self.slide.level_dimensions[level])
        image = _on_white(self._read_region(0, 0, level, size))
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return np.asarray(image)

    def _read_region(self, left: int, top: int, level: int, size: tuple[int, int]) -> Image.Image:
        """RGBA of ``size`` level pixels from frame level pixel (left, top); transparent outside the frame."""
        level_downsample = self.slide.level_downsamples[level]
        location = (self.offset[0] + round(left * level_downsample), self.offset[1] + round(top * level_downsample))
        region = self.slide.read_region(location, level, size)
        if not self.cropped:
            return region  # OpenSlide itself reads transparent outside the slide
        frame_w, frame_h = (math.ceil(extent / level_downsample) for extent in self.size)
        cols, rows = np.arange(left, left + size[0]), np.arange(top, top + size[1])
        outside = ~(((rows >= 0) & (rows < frame_h))[:, None] & ((cols >= 0) & (cols < frame_w))[None, :])
        if outside.any():
            rgba = np.array(region)
            rgba[outside, 3] = 0
            region = Image.fromarray(rgba, "RGBA")
        return region

    def close(self) -> None:
        self.slide.close()

    def __enter__(self) -> OpenSlideReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _frame(properties: dict, dimensions: tuple[int, int],
           openslide_module: object) -> tuple[tuple[int, int], tuple[int, int]]:
    """(offset, size) of the scanned area the slide states with its bounds, else ((0, 0), ``dimensions``)."""
    keys = (openslide_module.PROPERTY_NAME_BOUNDS_X, openslide_module.PROPERTY_NAME_BOUNDS_Y,
            openslide_module.PROPERTY_NAME_BOUNDS_WIDTH, openslide_module.PROPERTY_NAME_BOUNDS_HEIGHT)
    try:
        x, y, width, height = (int(properties[key]) for key in keys)
    except (KeyError, ValueError):
        return (0, 0), tuple(dimensions)
    if width <= 0 or height <= 0:
        return (0, 0), tuple(dimensions)
    return (x, y), (width, height)


def _stated_mpp(properties: dict, openslide_module: object) -> float | None:
    """The slide's microns per pixel (mean of x and y) when stated and positive."""
    values = []
    for key in (openslide_module.PROPERTY_NAME_MPP_X, openslide_module.PROPERTY_NAME_MPP_Y):
        try:
            value = float(properties[key])
        except (KeyError, ValueError):
            return None
        if not math.isfinite(value) or value <= 0:
            return None
        values.append(value)
    return sum(values) / 2


def _on_white(region: Image.Image) -> Image.Image:
    """RGBA (transparent outside the scanned area) composited onto white glass, as RGB."""
    background = Image.new("RGB", region.size, (WHITE, WHITE, WHITE))
    background.paste(region, mask=region.getchannel("A"))
    return background
