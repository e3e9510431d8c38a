"""Class regions of a finished mask TIFF as QuPath GeoJSON annotations that tile the tissue.

The output is what QuPath's own exporter writes and imports as annotations (TIAToolbox's
``AnnotationStore.from_geojson`` and LazySlide read it too): a FeatureCollection in level-0 pixel
coordinates of the mask (the slide's frame) with one Polygon feature per connected region of a
class (4-connected, holes kept), ``properties.objectType = "annotation"``, ``classification =
{name, color: [r, g, b]}`` and the region's area in µm² under ``measurements`` (named so that
QuPath keeps it beside its own "Area µm^2"). Background (glass, and background inside the
tissue) gets no feature.

The regions are traced on a level of the mask pyramid, the coarsest whose pixel is no wider than
half the simplification tolerance, read one band of tile rows at a time. Polygons come from
``rasterio.features.shapes`` (GDAL's polygonizer: outlines on pixel edges, so a polygon's area is
exactly its pixel count). Each band's regions, background included, form a polygonal coverage
(every pixel corner on an outline made a vertex, so neighbours share their edges vertex for vertex)
that ``shapely.coverage_simplify`` (Visvalingam-Whyatt) simplifies as a whole, keeping the band's
own edges: an edge two regions share is simplified once for both, so features never overlap and
leave no sliver between them. A region that reaches a band's lower edge is held back and united
(shapely) with the pieces of its class it shares a stretch of that edge with in the next band.
Finished regions below the minimum area are left out, the others are written out at once; only
the regions still open at the current band edge are kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import shapely
import tifffile
from rasterio.features import shapes
from shapely import affinity
from shapely.geometry import Polygon, box, shape
from shapely.geometry.polygon import orient

from construct.classes import ClassSet

BAND_PIXELS = 16_000_000
"""About how many pixels of the reduced mask level are traced at once (a band of whole tile rows)."""
AREA_MEASUREMENT = "Class area µm^2"
"""Name of the area measurement: QuPath >= 0.6 drops an imported measurement named like its own "Area µm^2"."""


@dataclass(frozen=True)
class RegionSettings:
    simplify_um: float
    """Simplification tolerance in µm (inference.slide.regions_simplify_um)."""
    min_area_um2: float
    """Regions below this area in µm² are left out (inference.slide.regions_min_area_um2)."""


@dataclass
class RegionSummary:
    level: int
    """Mask pyramid level the regions were traced on."""
    features: int = 0
    area_um2: dict[str, float] = field(default_factory=dict)
    """Summed area of each tissue class's features."""


def trace_level(level_sizes: list[tuple[int, int]], mpp: float, simplify_um: float) -> int:
    """The coarsest pyramid level whose pixel is at most half ``simplify_um`` wide (level 0 at least).

    Level k keeps every 2^k-th pixel of level 0 (:func:`construct.data.mask_tiff.pyramid_sizes`), so
    its outlines are off by up to a pixel before simplification moves them: half the tolerance keeps
    the two errors together within about the tolerance; finer detail would be simplified away anyway.
    """
    level = 0
    for index in range(len(level_sizes)):
        if mpp * 2**index <= simplify_um / 2:
            level = index
    return level


def mask_level_bands(path: Path, level: int) -> Iterator[tuple[int, np.ndarray]]:
    """(top row, rows × width uint8) bands of whole tile rows of one level of a tiled mask TIFF, top to bottom.

    Tiles are decoded one at a time into the band (about :data:`BAND_PIXELS`), so only a band is ever held.
    """
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[level].keyframe
        height, width = page.shape[:2]
        tile_h, tile_w = page.tilelength, page.tilewidth
        band_rows = max(tile_h, BAND_PIXELS // max(width, 1) // tile_h * tile_h)
        band_top, band = 0, np.empty((min(band_rows, height), width), np.uint8)
        for data, index, _ in page.segments(maxworkers=1):
            top, left = index[2], index[3]
            if top >= band_top + band_rows:
                yield band_top, band
                band_top, band = top, np.empty((min(band_rows, height - top), width), np.uint8)
            if data is None:  # MaskTiffWriter writes every tile
                raise ValueError(f"{path}: level {level} has no tile at row {top}, column {left}")
            tile = np.asarray(data).reshape(tile_h, tile_w)
            rows, cols = min(tile_h, height - top), min(tile_w, width - left)
            band[top - band_top:top - band_top + rows, left:left + cols] = tile[:rows, :cols]
        yield band_top, band


def simplified_regions(bands: Iterator[tuple[int, np.ndarray]], height: int, tolerance: float,
                       background: int) -> Iterator[tuple[int, Polygon]]:
    """(value, simplified polygon in the bands' pixels) of every 4-connected region that is not ``background``.

    Each band's regions, background included, are simplified together as one coverage whose outline
    (the band's edges) stays as it is, so that a region's pieces in neighbouring bands still meet
    along the band edge; a region crossing band edges comes out once, whole, when the band below it
    no longer continues it.
    """
    open_regions: list[tuple[int, Polygon]] = []  # regions that reach the lower edge of the last band
    for top, rows in bands:
        bottom = top + rows.shape[0]
        traced = [(int(value), affinity.translate(shape(geometry), 0, top))
                  for geometry, value in shapes(rows, connectivity=4)]
        above, open_regions = open_regions, []
        for value, polygon in _join_at_edge(above, _simplify_band(traced, tolerance, background), top):
            if bottom < height and polygon.bounds[3] >= bottom:
                open_regions.append((value, polygon))
            else:
                yield value, polygon


def _simplify_band(traced: list[tuple[int, Polygon]], tolerance: float, background: int) -> list[tuple[int, Polygon]]:
    """The band's regions but background, simplified as one coverage with the band's outline kept."""
    # A vertex at every pixel corner on the outlines: the polygonizer leaves out corners where only a
    # neighbour's outline turns, and a coverage needs its shared edges vertex for vertex on both sides.
    coverage = shapely.segmentize(np.array([polygon for _, polygon in traced], dtype=object), 1.0)
    simplified = shapely.coverage_simplify(coverage, tolerance, simplify_boundary=False)
    return [(value, part) for (value, _), polygon in zip(traced, simplified) if value != background
            for part in _valid_polygons(polygon)]


def _join_at_edge(above: list[tuple[int, Polygon]], traced: list[tuple[int, Polygon]],
                  edge: int) -> Iterator[tuple[int, Polygon]]:
    """Every region after uniting each region ``above`` the edge with the traced ones of its class it shares
    a stretch of the edge with; regions that continue nothing come out unchanged."""
    if not above:
        yield from traced
        return
    parent = list(range(len(above) + len(traced)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    regions = above + traced
    tree = shapely.STRtree([polygon for _, polygon in above])
    for j, (value, polygon) in enumerate(traced, start=len(above)):
        if polygon.bounds[1] > edge:
            continue
        for i in tree.query(polygon, predicate="intersects"):
            # Same class and a shared stretch of the edge (a shared corner only is not 4-connected).
            if above[i][0] == value and polygon.intersection(above[i][1]).length > 0:
                parent[root(int(i))] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(regions)):
        groups.setdefault(root(i), []).append(i)
    for members in groups.values():
        if len(members) == 1:
            yield regions[members[0]]
        else:
            yield regions[members[0]][0], shapely.union_all([regions[i][1] for i in members])


def region_features(mask_path: Path, classes: ClassSet, mpp: float, settings: RegionSettings,
                    summary: RegionSummary | None = None) -> Iterator[dict[str, Any]]:
    """The GeoJSON features of a mask TIFF written by :class:`~construct.data.mask_tiff.MaskTiffWriter`."""
    with tifffile.TiffFile(mask_path) as tif:
        sizes = [(level.shape[1], level.shape[0]) for level in tif.series[0].levels]
    level = trace_level(sizes, mpp, settings.simplify_um)
    (width, height), level_h = sizes[0], sizes[level][1]
    factor = 2**level
    # Level pixel (i, j) is the sample of level-0 pixel (i, j) * 2^level: it stands for the block of
    # whole pixels about centred on that pixel (not the block it starts, which would shift outlines by
    # half a block; whole pixels, so that no outline runs through pixel centres).
    to_level0 = [factor, 0, 0, factor, -((factor - 1) // 2), -((factor - 1) // 2)]
    extent = box(0, 0, width, height)
    tolerance = settings.simplify_um / (mpp * factor)  # in level pixels
    um2_per_px = mpp * mpp
    if summary is not None:
        summary.level = level
        summary.area_um2.update({name: 0.0 for name in classes.names})
    for value, polygon in simplified_regions(mask_level_bands(mask_path, level), level_h, tolerance,
                                             classes.background):
        if value >= classes.num_classes:
            continue  # not a class of this model (a mask of another class set)
        polygon = affinity.affine_transform(polygon, to_level0)
        if level:
            polygon = polygon.intersection(extent)
        for part in _valid_polygons(polygon):
            area_um2 = part.area * um2_per_px
            if area_um2 < settings.min_area_um2:
                continue
            if summary is not None:
                summary.features += 1
                summary.area_um2[classes.names[value]] += area_um2
            yield _feature(part, classes.names[value], classes.colors[value], area_um2)


def _valid_polygons(geometry: Any) -> list[Polygon]:
    """The polygons of ``geometry``, repaired when the polygonizer's rings touched themselves."""
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry, method="structure", keep_collapsed=False)
    if isinstance(geometry, Polygon):
        return [] if geometry.is_empty else [geometry]
    return [part for part in getattr(geometry, "geoms", []) if isinstance(part, Polygon) and not part.is_empty]


def _feature(polygon: Polygon, name: str, color: tuple[int, int, int], area_um2: float) -> dict[str, Any]:
    polygon = orient(polygon, 1.0)  # RFC 7946: exterior counter-clockwise, holes clockwise
    rings = [polygon.exterior, *polygon.interiors]
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [_ring_coordinates(ring) for ring in rings]},
        "properties": {
            "objectType": "annotation",
            "classification": {"name": name, "color": list(color)},
            "measurements": {AREA_MEASUREMENT: round(area_um2, 3)},
        },
    }


def _ring_coordinates(ring: Any) -> list[list[float]]:
    points = shapely.get_coordinates(ring)
    # Vertices lie on pixel corners: whole numbers, written as JSON integers.
    return [[_number(x), _number(y)] for x, y in points]


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(float(value), 3)


def write_regions(mask_path: Path, out_path: Path, classes: ClassSet, mpp: float,
                  settings: RegionSettings) -> RegionSummary:
    """Write the regions of ``mask_path`` to ``out_path`` as GeoJSON, a feature at a time."""
    summary = RegionSummary(level=0)
    with open(out_path, "w", encoding="utf-8") as handle:
        _write_collection(handle, region_features(mask_path, classes, mpp, settings, summary))
    return summary


def _write_collection(handle: TextIO, features: Iterator[dict[str, Any]]) -> None:
    handle.write('{"type": "FeatureCollection", "features": [')
    for index, feature in enumerate(features):
        handle.write(",\n" if index else "\n")
        handle.write(json.dumps(feature, ensure_ascii=False, separators=(",", ":")))
    handle.write("\n]}\n")


def rasterize_regions(path: Path, size: tuple[int, int], classes: ClassSet) -> np.ndarray:
    """The class index of every level-0 pixel under the GeoJSON's features (background elsewhere)."""
    from rasterio.features import rasterize

    collection = json.loads(Path(path).read_text(encoding="utf-8"))
    index = {name: i for i, name in enumerate(classes.names)}
    pairs = [(feature["geometry"], index[feature["properties"]["classification"]["name"]])
             for feature in collection["features"]]
    width, height = size
    if not pairs:
        return np.full((height, width), classes.background, np.uint8)
    return rasterize(pairs, out_shape=(height, width), fill=classes.background, dtype=np.uint8)

