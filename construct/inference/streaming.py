"""Streaming prediction of an image of any size (a whole slide, a large region) in bounded memory.

Two interleaved stages walk the image top to bottom:

1. **Tiles.** Tissue tiles of ``model.image_size`` px, every ``stride`` px at the model's resolution,
   are read in batches and run through the network. Each tile's CAMs are normalised and gated by
   its own class presence, exactly as a BCSS tile is at evaluation, and averaged with its
   overlapping neighbours on a coarse cell grid (:class:`CamCanvas`).
2. **Windows.** Once the cells a band of output rows needs are final, the band is cut into windows
   of ``window`` output px; each window (plus ``margin`` model px of context on every side) gets
   pixel probabilities (upsampled cells + background channel), is refined by the dense CRF in
   the pool and cropped back to its core. Output pixels map to model pixels by nearest neighbour,
   so the mask comes out on the image's own level-0 grid whatever the model's resolution.

Bands are yielded as soon as they are complete; nothing the size of the image is ever held.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from construct.config import Config
from construct.data.slide_reader import ArrayReader, RegionReader
from construct.inference.cam_canvas import CamCanvas
from construct.inference.postprocess import apply_background_prior
from construct.inference.predictor import Predictor
from construct.inference.segmenter import SegmenterPredictor
from construct.inference.tiling import check_tileable, window_stride
from construct.inference.tissue import TissueMask


@dataclass(frozen=True)
class StreamSettings:
    tile: int
    """Network input side (model.image_size), model px."""
    stride: int
    """Tile step, model px (≤ tile)."""
    window: int
    """Side of a CRF window's core, output px (``inference.slide.window`` model px, converted)."""
    margin: int
    """Context added to each side of a CRF window, model px."""
    downsample: float = 1.0
    """Level-0 px per model px (model µm/px ÷ image µm/px); 1 = predict at the image's own pixels."""


@dataclass
class Band:
    """``mask.shape[0]`` finished output rows starting at row ``top``."""

    top: int
    mask: np.ndarray
    """rows × width uint8 class indices (C = background, and everything outside the tissue)."""
    cams: np.ndarray | None = None
    """C × rows × width float16 gated class maps (only when asked for)."""


@dataclass
class StreamStats:
    tiles: int = 0
    """Tiles run through the network."""
    windows: int = 0
    """Windows with tissue (refined by the CRF when it is on)."""
    class_pixels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Output pixels of each class (the classes, then background) inside the tissue."""


def stream_settings(config: Config, downsample: float = 1.0) -> StreamSettings:
    """Settings from ``config`` for an image whose level-0 pixels are ``downsample`` model px wide."""
    slide = config.inference.slide
    return StreamSettings(tile=config.model.image_size, stride=window_stride(config),
                          window=max(1, round(slide.window * downsample)), margin=slide.margin, downsample=downsample)


def canvas_cell(tile: int, stride: int, cam_grid: int) -> int:
    """Cell size (px) of the CAM grid: the finest that both tile offsets and the CAM's own cells align to."""
    return math.gcd(math.gcd(tile, stride), max(1, tile // cam_grid))


def tile_offsets(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts every ``stride`` px until the image's far edge is covered (the last tile may overhang)."""
    return [k * stride for k in range(math.ceil(max(length - tile, 0) / stride) + 1)]


class StreamingPredictor:
    """Streams the mask of one image read through ``reader``; see the module docstring.

    ``tissue`` limits the work to tissue (pixels outside it are background); ``keep_cams``
    also returns the class maps. ``progress`` is called with the output pixels of each finished
    window. :attr:`stats` fills in as bands are produced.
    """

    def __init__(self, predictor: Predictor | SegmenterPredictor, reader: RegionReader, settings: StreamSettings, tissue: TissueMask,
                 keep_cams: bool = False, progress: Callable[[int], None] | None = None) -> None:
        self.predictor = predictor
        self.reader = reader
        self.settings = settings
        self.tissue = tissue
        self.keep_cams = keep_cams
        self.progress = progress or (lambda pixels: None)
        self.classes = predictor.classes
        self.stats = StreamStats(class_pixels=np.zeros(self.classes.num_classes + 1, np.int64))
        self.batch_size = predictor.config.inference.batch_size
        width, height = reader.size
        self.model_size = (math.ceil(width / settings.downsample), math.ceil(height / settings.downsample))
        self.margin = settings.margin if predictor.uses_crf else 0  # argmax needs no context
        if not 0 < settings.stride <= settings.tile:
            raise ValueError(f"stride {settings.stride} must lie in 1..{settings.tile} or tiles leave gaps")

    # --- geometry ------------------------------------------------------------------------------

    def model_index(self, output: np.ndarray, length: int) -> np.ndarray:
        """Nearest model pixel of each output pixel (centre to centre)."""
        return np.minimum(np.floor((output + 0.5) / self.settings.downsample).astype(np.int64), length - 1)

    def context_box(self, x0: int, y0: int, x1: int, y1: int) -> tuple[int, int, int, int]:
        """Model-px box a window of output px [x0, x1) × [y0, y1) reads: its core plus the margin, clipped."""
        model_w, model_h = self.model_size
        cols = self.model_index(np.array([x0, x1 - 1]), model_w)
        rows = self.model_index(np.array([y0, y1 - 1]), model_h)
        return (max(0, int(cols[0]) - self.margin), max(0, int(rows[0]) - self.margin),
                min(model_w, int(cols[1]) + 1 + self.margin), min(model_h, int(rows[1]) + 1 + self.margin))

    def tiles(self) -> Iterator[tuple[int, int]]:
        """(x, y) model-px offsets of the tiles that touch tissue, row by row (made as needed, never all listed)."""
        tile, stride, scale = self.settings.tile, self.settings.stride, self.settings.downsample
        model_w, model_h = self.model_size
        for y in tile_offsets(model_h, tile, stride):
            for x in tile_offsets(model_w, tile, stride):
                if self.tissue.any_in(x * scale, y * scale, (x + tile) * scale, (y + tile) * scale):
                    yield x, y

    # --- stage 1: tiles ------------------------------------------------------------------------

    def read_tiles(self, positions: list[tuple[int, int]]) -> torch.Tensor:
        """N×3×tile×tile [0, 1] pixels; neighbours in one row are read as one strip."""
        tile, scale = self.settings.tile, self.settings.downsample
        crops = []
        start = 0
        while start < len(positions):
            end = start + 1
            y = positions[start][1]
            while end < len(positions) and positions[end][1] == y and positions[end][0] - positions[end - 1][0] < tile:
                end += 1
            x0, x1 = positions[start][0], positions[end - 1][0] + tile
            strip = self.reader.read(x0 * scale, y * scale, x1 - x0, tile, scale)
            crops.extend(strip[:, x - x0:x - x0 + tile] for x, _ in positions[start:end])
            start = end
        pixels = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)
        return pixels.float().div_(255.0)

    def predict_tiles(self, positions: list[tuple[int, int]], canvas: CamCanvas) -> None:
        """Network → each tile's class maps (stage 1: normalised CAMs gated by the tile's own presence;
        stage 2: class probabilities) on the tile's cells → summed into the canvas."""
        maps = self.predictor.tile_maps(self.read_tiles(positions))
        cells = self.settings.tile // canvas.cell
        maps = F.interpolate(maps.float(), size=(cells, cells), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
        for (x, y), tile_cells in zip(positions, maps.cpu()):
            canvas.add(tile_cells, x, y)
        self.stats.tiles += len(positions)

    def make_canvas(self) -> CamCanvas:
        """The cell grid, sized from the network's output grid on one blank tile."""
        tile, stride = self.settings.tile, self.settings.stride
        maps = self.predictor.tile_maps(torch.ones(1, 3, tile, tile))
        cell = canvas_cell(tile, stride, maps.shape[-1])
        model_w, model_h = self.model_size
        rows = (tile_offsets(model_h, tile, stride)[-1] + tile) // cell
        cols = (tile_offsets(model_w, tile, stride)[-1] + tile) // cell
        return CamCanvas(maps.shape[1], rows, cols, cell)

    # --- stage 2: windows ----------------------------------------------------------------------

    def band_rows(self) -> list[tuple[int, int]]:
        height = self.reader.size[1]
        return [(top, min(top + self.settings.window, height)) for top in range(0, height, self.settings.window)]

    def band_ready_row(self, canvas: CamCanvas, top: int, bottom: int) -> int:
        """Grid row that must be final before output rows [top, bottom) can be made."""
        _, y0, _, y1 = self.context_box(0, top, 1, bottom)
        return canvas.rows_needed(y0, y1)

    def probabilities(self, canvas: CamCanvas, box: tuple[int, int, int, int]) -> np.ndarray:
        """(C+1)×h×w float32 class probabilities of a model-px box (stage 1: gated class maps and the
        background channel, method.md §7)."""
        return self.predictor.window_probabilities(canvas.window(*box)).numpy()

    def make_band(self, canvas: CamCanvas, top: int, bottom: int) -> Band:
        width = self.reader.size[0]
        rows = bottom - top
        mask = np.full((rows, width), self.classes.background, np.uint8)
        cams = np.zeros((self.classes.num_classes, rows, width), np.float16) if self.keep_cams else None
        jobs = []  # windows with tissue: (x0, x1, tissue, context box, image, probs)
        for x0 in range(0, width, self.settings.window):
            x1 = min(x0 + self.settings.window, width)
            tissue = self._window_tissue(x0, top, x1, bottom)
            if tissue is None:
                self.progress((x1 - x0) * rows)
                continue
            box = self.context_box(x0, top, x1, bottom)
            image = self.reader.read(box[0] * self.settings.downsample, box[1] * self.settings.downsample,
                                     box[2] - box[0], box[3] - box[1], self.settings.downsample)
            jobs.append((x0, x1, tissue, box, image, self.probabilities(canvas, box)))
            if len(jobs) == self._parallel_windows():
                self._finish_windows(jobs, top, bottom, mask, cams)
                jobs = []
        self._finish_windows(jobs, top, bottom, mask, cams)
        return Band(top, mask, cams)

    def _parallel_windows(self) -> int:
        crf = self.predictor.crf
        return crf.workers if crf is not None else 1

    def _window_tissue(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray | None:
        """The window's per-pixel tissue mask, or None when it holds no tissue (glass is not predicted)."""
        pad_x, pad_y = self.tissue.scale_x, self.tissue.scale_y  # one thumbnail px: interpolation reach
        if not self.tissue.any_in(x0 - pad_x, y0 - pad_y, x1 + pad_x, y1 + pad_y):
            return None
        tissue = self.tissue.sample(x0, y0, x1 - x0, y1 - y0)
        return tissue if tissue.any() else None

    def _finish_windows(self, jobs: list, top: int, bottom: int, mask: np.ndarray, cams: np.ndarray | None) -> None:
        if not jobs:
            return
        if self.predictor.crf is not None:
            labels = self.predictor.crf([job[4] for job in jobs], [job[5] for job in jobs])
        else:
            labels = [job[5].argmax(axis=0).astype(np.uint8) for job in jobs]
        prior = self.predictor.background_prior
        if prior is not None:
            labels = [apply_background_prior(window_labels, job[4], prior.grey_threshold, prior.min_size,
                                             self.classes.background) for window_labels, job in zip(labels, jobs)]
        model_w, model_h = self.model_size
        rows = self.model_index(np.arange(top, bottom), model_h)
        for (x0, x1, tissue, box, _, probs), window_labels in zip(jobs, labels):
            cols = self.model_index(np.arange(x0, x1), model_w)
            pick = np.ix_(rows - box[1], cols - box[0])
            core = np.where(tissue, window_labels[pick], self.classes.background).astype(np.uint8)
            mask[:, x0:x1] = core
            if cams is not None:
                cams[:, :, x0:x1] = probs[:-1][(slice(None), *pick)] * tissue
            self.stats.class_pixels += np.bincount(core[tissue], minlength=self.classes.num_classes + 1)
            self.stats.windows += 1
            self.progress(core.size)

    # --- both ----------------------------------------------------------------------------------

    def bands(self) -> Iterator[Band]:
        """The mask, band by band from the top; tiles are predicted just ahead of the band that needs them."""
        canvas = self.make_canvas()
        tiles = self.tiles()
        upcoming = next(tiles, None)
        for top, bottom in self.band_rows():
            ready = self.band_ready_row(canvas, top, bottom)
            while canvas.final_until < ready:
                batch = []
                while upcoming is not None and len(batch) < self.batch_size:
                    batch.append(upcoming)
                    upcoming = next(tiles, None)
                if batch:
                    self.predict_tiles(batch, canvas)
                # Later tiles start at or below the upcoming one, so the rows above it are complete.
                canvas.finalize_until(canvas.rows if upcoming is None else upcoming[1] // canvas.cell)
            yield self.make_band(canvas, top, bottom)
            _, first_needed, _, _ = self.context_box(0, bottom, 1, min(bottom + 1, self.reader.size[1]))
            canvas.release_until(first_needed // canvas.cell - 1)


def predict_region(predictor: Predictor | SegmenterPredictor, image: np.ndarray, name: str,
                   keep_cams: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Mask (H×W uint8) and, with ``keep_cams``, gated class maps (C×H×W float16) of an in-memory region.

    The region is taken as all tissue at the model's resolution; it must be at least one tile in
    each side. Only the mask (and the maps asked for) grow with its area.
    """
    height, width = image.shape[:2]
    check_tileable(height, width, predictor.config.model.image_size, name)
    reader = ArrayReader(image, name)
    stream = StreamingPredictor(predictor, reader, stream_settings(predictor.config), TissueMask.everywhere(reader.size),
                                keep_cams=keep_cams)
    mask = np.empty((height, width), np.uint8)
    cams = np.empty((predictor.classes.num_classes, height, width), np.float16) if keep_cams else None
    for band in stream.bands():
        rows = slice(band.top, band.top + band.mask.shape[0])
        mask[rows] = band.mask
        if cams is not None:
            cams[:, rows] = band.cams
    return mask, cams
