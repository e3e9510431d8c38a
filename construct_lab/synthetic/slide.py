"""Synthetic whole slides: tiled pyramidal RGB TIFFs of any size, written tile by tile.

The tissue is an ellipse covering ~44% of the slide, textured with tiles of the synthetic BCSS
generator (:func:`construct_lab.synthetic.tiles.make_tile`), on near-white glass. Every pixel is a
function of its coordinates, so each 256-px TIFF tile of each pyramid level is made on its own
and memory stays small whatever the size. OpenSlide opens the files as "generic-tiff"; with
``mpp`` set they carry their resolution (pixels per centimetre), without it they have none.

    python -m construct_lab.synthetic.slide --out slide.tif --width 20000 --height 20000 --mpp 0.25
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from construct_lab.synthetic.tiles import make_tile

TILE = 256
GLASS = (242, 241, 239)
_TEXTURES = 8


class SyntheticSlide:
    """Pixel source of a ``width × height`` synthetic slide (``tissue=False``: glass only)."""

    def __init__(self, width: int, height: int, tissue: bool = True, seed: int = 0) -> None:
        self.width, self.height, self.tissue = width, height, tissue
        rng = np.random.default_rng(seed)
        self.textures = np.stack([make_tile(rng, TILE)[0] for _ in range(_TEXTURES)])

    def pixels(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """len(rows) × len(cols) × 3 uint8 at level-0 coordinates ``rows`` × ``cols``."""
        image = np.empty((len(rows), len(cols), 3), np.uint8)
        image[:] = GLASS
        if not self.tissue:
            return image
        texture = (rows[:, None] // TILE * 7 + cols[None, :] // TILE * 3) % _TEXTURES
        inside = ((cols[None, :] - self.width / 2) / (0.4 * self.width)) ** 2 \
            + ((rows[:, None] - self.height / 2) / (0.35 * self.height)) ** 2 <= 1.0
        painted = self.textures[texture, (rows % TILE)[:, None], (cols % TILE)[None, :]]
        image[inside] = painted[inside]
        return image

    def tiles(self, factor: int) -> Iterator[np.ndarray]:
        """TILE × TILE tiles, row by row, of the level that keeps every ``factor``-th pixel."""
        level_w, level_h = -(-self.width // factor), -(-self.height // factor)
        for top in range(0, level_h, TILE):
            for left in range(0, level_w, TILE):
                rows = np.minimum(np.arange(top, top + TILE) * factor, self.height - 1)
                cols = np.minimum(np.arange(left, left + TILE) * factor, self.width - 1)
                yield self.pixels(rows, cols)


def write_synthetic_slide(path: str | Path, width: int, height: int, mpp: float | None = 0.25, tissue: bool = True,
                          seed: int = 0) -> None:
    """Write the slide as a tiled pyramidal TIFF (levels halve until one fits in a tile)."""
    slide = SyntheticSlide(width, height, tissue, seed)
    factors = [1]
    while -(-width // factors[-1]) > TILE or -(-height // factors[-1]) > TILE:
        factors.append(factors[-1] * 2)
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**31) as tif:
        for level, factor in enumerate(factors):
            options = dict(tile=(TILE, TILE), photometric="rgb", compression="zlib", compressionargs={"level": 1},
                           metadata=None)
            if mpp is not None:
                pixels_per_cm = 1e4 / (mpp * factor)
                options.update(resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER")
            else:
                options.update(resolution=(1, 1), resolutionunit="NONE")
            if level:
                options["subfiletype"] = 1
            shape = (-(-height // factor), -(-width // factor), 3)
            tif.write(slide.tiles(factor), shape=shape, dtype=np.uint8, **options)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="TIFF file to write")
    parser.add_argument("--width", type=int, required=True, help="level-0 width in px")
    parser.add_argument("--height", type=int, required=True, help="level-0 height in px")
    parser.add_argument("--mpp", type=float, default=0.25, help="µm/px written to the file (default 0.25)")
    parser.add_argument("--seed", type=int, default=0, help="texture seed")
    args = parser.parse_args(argv)
    write_synthetic_slide(args.out, args.width, args.height, args.mpp, seed=args.seed)


if __name__ == "__main__":
    main()
