"""The slide mask as two tiled pyramids: class indices for analysis, their colours for viewing.

**Class indices** (:class:`MaskTiffWriter`, written band by band in bounded memory). One 8-bit
palette image per pyramid level (level 0 first, then each level at half the previous size, marked
as reduced-resolution pages), 256-px tiles, deflate compression and the resolution in pixels per
centimetre. tifffile and numpy read the pixels as class indices; OpenSlide ("generic-tiff") opens
it as a pyramid and applies the palette. Bio-Formats (QuPath's default reader for it) shows it as
one grey channel of the indices, without the reduced levels: hence the second file.

**Colours** (:func:`write_colour_pyramid`). The same pyramid with each index replaced by its class
colour, as an RGB OME-TIFF whose reduced levels are SubIFDs of level 0 and whose OME-XML states the
physical pixel size: Bio-Formats (and so QuPath) reads it as one image with resolution levels,
tiles and µm/px, in the class colours.

Level 0 goes straight into the index file as bands arrive. Each coarser level takes every 2^k-th
row and column (nearest neighbour: class indices must not be blended) and is spooled to a raw file
in ``scratch`` until level 0 is complete, then copied in. The colour file is made afterwards from
the finished index file, one tile at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tifffile

from construct.classes import ClassSet

TILE = 256
_BIGTIFF_ABOVE = 2**31  # bytes of level 0; classic TIFF offsets end at 4 GiB, compressed or not


def colormap(classes: ClassSet) -> np.ndarray:
    """3×256 uint16 TIFF colour map: the dataset's palette for the class indices, black for the rest."""
    table = np.zeros((3, 256), np.uint16)
    for index, rgb in enumerate(classes.palette):
        table[:, index] = [channel * 257 for channel in rgb]
    return table


def pyramid_sizes(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) of every level: halve until a level fits in one tile."""
    sizes = [(width, height)]
    while sizes[-1][0] > TILE or sizes[-1][1] > TILE:
        factor = 2 ** len(sizes)
        sizes.append((math.ceil(width / factor), math.ceil(height / factor)))
    return sizes


class MaskTiffWriter:
    """Writes the ``size`` (w, h) mask at ``mpp`` µm/px to ``path``, from bands given top to bottom."""

    def __init__(self, path: Path, size: tuple[int, int], mpp: float, scratch: Path, classes: ClassSet) -> None:
        self.path = path
        self.classes = classes
        self.size = size
        self.mpp = mpp
        self.sizes = pyramid_sizes(*size)
        self.scratch = scratch
        self.description = "ConStruct class mask: " + " ".join(f"{i}={name}" for i, name in enumerate(classes.all_names))

    def _page_options(self, level: int) -> dict:
        factor = 2**level
        pixels_per_cm = 1e4 / (self.mpp * factor)
        options = dict(photometric="palette", colormap=colormap(self.classes), tile=(TILE, TILE), compression="zlib",
                       resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER", metadata=None)
        if level == 0:
            options["description"] = self.description
        else:
            options["subfiletype"] = 1  # reduced-resolution version of level 0
        return options

    def write(self, bands: Iterable[tuple[int, np.ndarray]]) -> None:
        """Consume (top row, rows × width uint8) bands covering the mask from row 0 down, and write the file."""
        width, height = self.size
        spools = [self.scratch / f"level{level}.raw" for level in range(1, len(self.sizes))]
        handles = [open(path, "wb") for path in spools]
        try:
            bigtiff = width * height > _BIGTIFF_ABOVE
            with tifffile.TiffWriter(self.path, bigtiff=bigtiff) as tif:
                tif.write(self._level0_tiles(bands, handles), shape=(height, width), dtype=np.uint8,
                          **self._page_options(0))
                for handle in handles:
                    handle.close()
                for level, spool in enumerate(spools, start=1):
                    level_w, level_h = self.sizes[level]
                    tif.write(_raw_tiles(spool, level_w, level_h), shape=(level_h, level_w), dtype=np.uint8,
                              **self._page_options(level))
        finally:
            for handle in handles:
                handle.close()
            for spool in spools:
                spool.unlink(missing_ok=True)

    def _level0_tiles(self, bands: Iterable[tuple[int, np.ndarray]], handles: list) -> Iterator[np.ndarray]:
        width, height = self.size
        pending = np.zeros((0, width), np.uint8)  # rows received but not yet a full tile row
        expected_top = 0
        for top, rows in bands:
            if top != expected_top or rows.shape[1] != width:
                raise ValueError(f"band at row {top} ({rows.shape}) does not continue the mask at row {expected_top}")
            for level, handle in enumerate(handles, start=1):
                factor = 2**level
                handle.write(np.ascontiguousarray(rows[(-top) % factor::factor, ::factor]).tobytes())
            expected_top += rows.shape[0]
            pending = np.concatenate([pending, rows]) if pending.size else rows
            while pending.shape[0] >= TILE:
                yield from _row_of_tiles(pending[:TILE])
                pending = pending[TILE:]
        if expected_top != height:
            raise ValueError(f"bands ended at row {expected_top} of {height}")
        if pending.shape[0]:
            yield from _row_of_tiles(pending)


def _row_of_tiles(rows: np.ndarray) -> Iterator[np.ndarray]:
    """TILE×TILE tiles of up to TILE rows (zero-padded at the right and bottom edges)."""
    for x in range(0, rows.shape[1], TILE):
        tile = np.zeros((TILE, TILE), np.uint8)
        piece = rows[:, x:x + TILE]
        tile[:piece.shape[0], :piece.shape[1]] = piece
        yield tile


def _raw_tiles(path: Path, width: int, height: int) -> Iterator[np.ndarray]:
    with open(path, "rb") as handle:
        for top in range(0, height, TILE):
            count = min(TILE, height - top) * width
            rows = np.frombuffer(handle.read(count), np.uint8)
            if rows.size != count:
                raise ValueError(f"{path}: spooled level ends early at row {top}")
            yield from _row_of_tiles(rows.reshape(-1, width))


def colour_table(classes: ClassSet) -> np.ndarray:
    """256×3 uint8: the RGB colour of each class index (the palette of :func:`colormap`)."""
    return (colormap(classes).T // 257).astype(np.uint8)


def write_colour_pyramid(index_path: Path, path: Path, classes: ClassSet, mpp: float, name: str) -> None:
    """Write the class colours of the index mask at ``index_path`` as a pyramidal RGB OME-TIFF at ``path``.

    Every level of the index file becomes the same level here (level 0 a main image, the rest its
    SubIFDs), tile for tile; ``name`` is the image name in the OME-XML.
    """
    table = colour_table(classes)
    with tifffile.TiffFile(index_path) as source:
        pages = [level.keyframe for level in source.series[0].levels]
        width, height = pages[0].shape[1], pages[0].shape[0]
        with tifffile.TiffWriter(path, bigtiff=3 * width * height > _BIGTIFF_ABOVE, ome=True) as tif:
            for level, page in enumerate(pages):
                pixels_per_cm = 1e4 / (mpp * 2**level)
                options = dict(photometric="rgb", tile=(TILE, TILE), compression="zlib",
                               resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER")
                if level == 0:
                    options.update(subifds=len(pages) - 1, metadata={
                        "axes": "YXS", "Name": name, "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                        "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"})
                else:
                    options.update(subfiletype=1, metadata=None)
                tif.write(_coloured_tiles(page, table), shape=(*page.shape[:2], 3), dtype=np.uint8, **options)


def _coloured_tiles(page: tifffile.TiffPage, table: np.ndarray) -> Iterator[np.ndarray]:
    """The page's tiles (row by row, as stored) in colour."""
    for data, _, _ in page.segments(maxworkers=1):
        yield table[np.asarray(data).reshape(page.tilelength, page.tilewidth)]


def read_level(path: Path, level: int) -> np.ndarray:
    """One pyramid level of a mask TIFF written here: H×W uint8 indices, or H×W×3 colours."""
    with tifffile.TiffFile(path) as tif:
        return tif.series[0].levels[level].asarray()
