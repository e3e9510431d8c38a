"""Whole-slide prediction to files: the mask as pyramids of class indices and of class colours, an overview PNG,
class regions as GeoJSON, and a JSON of tissue areas.

:func:`open_slide` checks a slide up front (OpenSlide can read it, its resolution is known, it
holds tissue) so that bad inputs fail before the model loads; :func:`predict_slide` streams the
prediction (:mod:`construct.inference.streaming`) into the index TIFF and writes the rest from it. All
outputs share the slide reader's frame (:class:`~construct.data.slide_reader.OpenSlideReader`: the
scanned area QuPath displays, level-0 pixels from its top left corner). Every
file is written inside a hidden scratch folder in the output folder and renamed into place only
when all of them are complete (the JSON last), so a failed or interrupted run leaves nothing
half-written.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from construct.classes import ClassSet
from construct.config import Config
from construct.data.mask_tiff import MaskTiffWriter, read_level, write_colour_pyramid
from construct.data.slide_reader import OpenSlideReader
from construct.errors import DataError
from construct.inference.overview import draw_overview
from construct.inference.predictor import Predictor
from construct.inference.regions import RegionSettings, write_regions
from construct.inference.streaming import StreamingPredictor, stream_settings
from construct.inference.tissue import MAX_THUMBNAIL_SIDE, TissueMask, detect_tissue

OVERVIEW_SIDE = 1024
"""Default longer side (px) of each panel of the overview PNG."""


@dataclass
class SlideOutputs:
    mask: Path
    """Class indices (numpy, tifffile, OpenSlide)."""
    mask_colours: Path
    """The class colours as a pyramidal OME-TIFF (QuPath's default reader, Bio-Formats)."""
    overview: Path
    regions: Path
    areas: Path
    """Written last: its presence marks a complete result."""

    @classmethod
    def for_slide(cls, out_dir: Path, name: str) -> SlideOutputs:
        return cls(out_dir / f"{name}_mask.tif", out_dir / f"{name}_mask_rgb.ome.tif", out_dir / f"{name}_overview.png",
                   out_dir / f"{name}_regions.geojson", out_dir / f"{name}_areas.json")

    def files(self, regions: bool = True) -> list[Path]:
        """The files of one slide, in the order they are put in place (the areas JSON last)."""
        return [self.mask, self.mask_colours, self.overview, *([self.regions] if regions else []), self.areas]

    def complete(self, regions: bool = True) -> bool:
        return all(path.is_file() for path in self.files(regions))


@dataclass
class OpenedSlide:
    """A readable slide with a known resolution and its tissue mask."""

    reader: OpenSlideReader
    tissue: TissueMask


def open_slide(path: Path, config: Config, mpp: float | None = None) -> OpenedSlide:
    """Open ``path`` and find its tissue; DataError when it is no slide, has no resolution or no tissue."""
    reader = OpenSlideReader(path, mpp)
    try:
        width, height = reader.size
        side = math.ceil(max(width, height) * reader.mpp / config.inference.slide.tissue_mpp)
        thumbnail = reader.thumbnail(max(1, min(side, MAX_THUMBNAIL_SIDE)))
        mask = detect_tissue(thumbnail, config.inference.slide.tissue_saturation)
        if not mask.any():
            raise DataError(f"{path}: no tissue found (no thumbnail pixel reaches saturation "
                            f"{config.inference.slide.tissue_saturation}, inference.slide.tissue_saturation)")
    except BaseException:
        reader.close()
        raise
    return OpenedSlide(reader, TissueMask(mask, reader.size))


def area_report(class_pixels: np.ndarray, mpp: float, classes: ClassSet) -> dict[str, Any]:
    """Tissue area and each class's area (mm²) and share of it; the class areas add up to the tissue area."""
    mm2_per_pixel = (mpp / 1000.0) ** 2
    tissue = int(class_pixels.sum())
    return {
        "tissue_mm2": tissue * mm2_per_pixel,
        "areas_mm2": {name: int(count) * mm2_per_pixel for name, count in zip(classes.all_names, class_pixels)},
        "fractions": {name: (int(count) / tissue if tissue else 0.0) for name, count in zip(classes.all_names, class_pixels)},
    }


def region_settings(config: Config) -> RegionSettings:
    slide = config.inference.slide
    return RegionSettings(simplify_um=slide.regions_simplify_um, min_area_um2=slide.regions_min_area_um2)


def predict_slide(slide: OpenedSlide, predictor: Predictor, out_dir: Path,
                  progress: Callable[[int], None] | None = None, overview_side: int = OVERVIEW_SIDE,
                  regions: bool = True, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Predict ``slide`` into :class:`SlideOutputs` in ``out_dir``; returns what the JSON holds.

    ``progress`` is called with the output pixels of each finished window; ``overview_side`` is the
    longer side of each panel of the overview PNG; ``regions`` also writes the class regions as
    GeoJSON (traced from the finished mask TIFF, :mod:`construct.inference.regions`);
    ``provenance`` (e.g. the checkpoint and config used) is stored in the JSON as it is.
    """
    started = time.perf_counter()
    reader = slide.reader
    config = predictor.config
    outputs = SlideOutputs.for_slide(out_dir, reader.name)
    if reader.path.resolve() in {p.resolve() for p in outputs.files()}:
        raise DataError(f"{reader.path}: the output would overwrite the slide; choose another --out-dir")
    stream = StreamingPredictor(predictor, reader, stream_settings(config, config.data.mpp / reader.mpp),
                                slide.tissue, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{reader.name}.") as scratch:
        scratch = Path(scratch)
        staged = SlideOutputs.for_slide(scratch, reader.name)
        classes = predictor.classes
        writer = MaskTiffWriter(staged.mask, reader.size, reader.mpp, scratch, classes)
        writer.write((band.top, band.mask) for band in stream.bands())
        write_colour_pyramid(staged.mask, staged.mask_colours, classes, reader.mpp, reader.name)
        report = {
            "slide": str(reader.path), "vendor": reader.vendor, "size_px": list(reader.size),
            "frame_offset_px": list(reader.offset), "mpp": reader.mpp, "mpp_source": reader.mpp_source,
            "model_mpp": config.data.mpp, "mask": outputs.mask.name, "mask_colours": outputs.mask_colours.name,
            "mask_levels": len(writer.sizes), "overview": outputs.overview.name,
            "class_indices": {name: index for index, name in enumerate(classes.all_names)},
            "class_colors": {name: list(rgb) for name, rgb in zip(classes.all_names, classes.palette)},
            **area_report(stream.stats.class_pixels, reader.mpp, classes),
            "tiles": stream.stats.tiles, "crf": predictor.uses_crf, "tta": predictor.tta.record(),
            **(provenance or {}),
        }
        thumbnail = reader.thumbnail(overview_side)
        level = _overview_level(writer.sizes, thumbnail.shape[1], thumbnail.shape[0])
        title = f"{reader.path.name}: {report['tissue_mm2']:.2f} mm² tissue at {reader.mpp:.3f} µm/px"
        shares = [report["fractions"][name] for name in classes.all_names]
        # Saved directly: the scratch folder already makes it atomic (and the file gets the usual permissions).
        overview = draw_overview(thumbnail, read_level(staged.mask, level), shares, title, classes)
        Image.fromarray(overview).save(staged.overview)
        if regions:
            traced = time.perf_counter()
            settings = region_settings(config)
            summary = write_regions(staged.mask, staged.regions, classes, reader.mpp, settings)
            report["regions"] = {"file": outputs.regions.name, "features": summary.features, "mask_level": summary.level,
                                 "simplify_um": settings.simplify_um, "min_area_um2": settings.min_area_um2,
                                 "seconds": round(time.perf_counter() - traced, 2)}
        report["seconds"] = round(time.perf_counter() - started, 2)
        staged.areas.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for staged_file, output in zip(staged.files(regions), outputs.files(regions)):
            os.replace(staged_file, output)  # the JSON last: it marks a complete result
    return report


def _overview_level(sizes: list[tuple[int, int]], width: int, height: int) -> int:
    """The coarsest pyramid level still at least as large as the thumbnail."""
    return max(i for i, (w, h) in enumerate(sizes) if i == 0 or (w >= width and h >= height))
