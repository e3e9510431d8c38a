"""CAMs of overlapping tiles averaged on a coarse cell grid, kept only for the rows still needed.

Tiles arrive in row-major order. Each tile's CAMs (already normalised and gated, resized to the
tile's cells) are summed into open rows with a count per cell; once no later tile can reach a
row, it is divided by its count and becomes final; final rows are released once every CRF window
that needs them is done. Memory is therefore a few tile-heights of cells times the slide width,
never the slide's area. Pixel-resolution probabilities are made on demand, window by window,
by bilinear upsampling of the final cells.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class CamCanvas:
    """Averaged class maps on a ``rows × cols`` grid of ``cell``-px cells, streamed top to bottom."""

    def __init__(self, classes: int, rows: int, cols: int, cell: int) -> None:
        self.classes, self.rows, self.cols, self.cell = classes, rows, cols, cell
        self._sums = torch.zeros(classes, 0, cols)
        self._counts = torch.zeros(1, 0, cols)
        self._open_from = 0  # grid row of _sums[:, 0]
        self._final = torch.zeros(classes, 0, cols)
        self._final_from = 0  # grid row of _final[:, 0]

    @property
    def final_until(self) -> int:
        """Grid rows before this one are final (readable with :meth:`window`)."""
        return self._open_from

    def add(self, cells: torch.Tensor, x: int, y: int) -> None:
        """Sum one tile's C×k×k cells into the grid at pixel offset (x, y) (multiples of ``cell``)."""
        row, col = y // self.cell, x // self.cell
        size = cells.shape[-1]
        if row < self._open_from:
            raise ValueError(f"tile at y={y} arrived after grid row {row} was finalised")
        missing = row + size - (self._open_from + self._sums.shape[1])
        if missing > 0:
            self._sums = torch.cat([self._sums, self._sums.new_zeros(self.classes, missing, self.cols)], dim=1)
            self._counts = torch.cat([self._counts, self._counts.new_zeros(1, missing, self.cols)], dim=1)
        top = row - self._open_from
        self._sums[:, top:top + size, col:col + size] += cells
        self._counts[:, top:top + size, col:col + size] += 1

    def finalize_until(self, row: int) -> None:
        """Grid rows before ``row`` will receive no more tiles: average them and make them final."""
        row = min(row, self.rows)
        count = row - self._open_from
        if count <= 0:
            return
        opened = self._sums.shape[1]
        if count > opened:  # rows no tile reached (glass): zero class maps
            self._sums = torch.cat([self._sums, self._sums.new_zeros(self.classes, count - opened, self.cols)], dim=1)
            self._counts = torch.cat([self._counts, self._counts.new_zeros(1, count - opened, self.cols)], dim=1)
        averaged = self._sums[:, :count] / self._counts[:, :count].clamp_min(1)
        self._final = torch.cat([self._final, averaged], dim=1)
        self._sums, self._counts = self._sums[:, count:].clone(), self._counts[:, count:].clone()
        self._open_from = row

    def release_until(self, row: int) -> None:
        """Forget final grid rows before ``row`` (no window needs them any more)."""
        drop = min(row, self._open_from) - self._final_from
        if drop > 0:
            self._final = self._final[:, drop:].clone()
            self._final_from += drop

    def rows_needed(self, y0: int, y1: int) -> int:
        """The grid row that must be final before pixel rows [y0, y1) can be upsampled (exclusive)."""
        return min(self.rows, math.ceil(y1 / self.cell) + 1)

    def window(self, x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
        """C×(y1−y0)×(x1−x0) class maps at pixel resolution: bilinear (half-pixel centres) from the cells.

        One spare cell on each side makes a window equal the same pixels of a whole-grid upsampling;
        beyond the grid the edge cells repeat, as bilinear resizing does at image borders.
        """
        cell = self.cell
        top, bottom = y0 // cell - 1, math.ceil(y1 / cell) + 1
        left, right = x0 // cell - 1, math.ceil(x1 / cell) + 1
        rows = torch.arange(top, bottom).clamp(0, self.rows - 1)
        cols = torch.arange(left, right).clamp(0, self.cols - 1)
        if rows.min() < self._final_from or rows.max() >= self._open_from:
            raise ValueError(f"pixel rows {y0}..{y1} need grid rows {int(rows.min())}..{int(rows.max())}, "
                             f"but rows {self._final_from}..{self._open_from - 1} are final and kept")
        cells = self._final[:, rows - self._final_from][:, :, cols]
        pixels = F.interpolate(cells[None], scale_factor=cell, mode="bilinear", align_corners=False)[0]
        return pixels[:, y0 - top * cell:y1 - top * cell, x0 - left * cell:x1 - left * cell]
