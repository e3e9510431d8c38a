"""How well a slide's region GeoJSON stands for its mask: overlap between features and agreement with the mask.

Reads the outputs ``predict_slides`` wrote for a slide (``<name>_mask.tif``, ``<name>_regions.geojson``)
and prints, as one JSON line: the number of features, the area where two or more features overlap
(share of the summed feature area), and the share of the slide's tissue pixels (detected as the
prediction detects them) whose class drawn from the GeoJSON equals the mask's at level 0. With
``--retrace`` the regions are traced again from the mask with the code and settings at hand first.

    python -m construct_lab.region_check SLIDE --out-dir OUT --config CONFIG [--retrace]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import shapely
from shapely.geometry import shape

from construct.classes import ClassSet
from construct.config import load_config
from construct.data.mask_tiff import read_level
from construct.inference.regions import rasterize_regions, write_regions
from construct.inference.slide import SlideOutputs, open_slide, region_settings


def feature_overlap(geojson: Path) -> tuple[int, float, float]:
    """(features, area covered by two or more features, summed feature area), in px²."""
    geometries = [shape(f["geometry"]) for f in json.loads(geojson.read_text(encoding="utf-8"))["features"]]
    tree = shapely.STRtree(geometries)
    overlap = 0.0
    for i, j in tree.query(geometries, predicate="intersects").T:
        if i < j:
            overlap += geometries[i].intersection(geometries[j]).area
    return len(geometries), overlap, sum(g.area for g in geometries)


def check(slide_path: Path, out_dir: Path, config_path: Path, retrace: bool) -> dict:
    config = load_config(config_path)
    classes = ClassSet.from_config(config)
    outputs = SlideOutputs.for_slide(out_dir, slide_path.stem)
    slide = open_slide(slide_path, config)
    with slide.reader as reader, tempfile.TemporaryDirectory() as scratch:
        regions = outputs.regions
        if retrace:
            regions = Path(scratch) / regions.name
            write_regions(outputs.mask, regions, classes, reader.mpp, region_settings(config))
        tissue = slide.tissue.sample(0, 0, *reader.size)
        mask = read_level(outputs.mask, 0)
        drawn = rasterize_regions(regions, reader.size, classes)
        features, overlap, total = feature_overlap(regions)
        return {"slide": slide_path.name, "size_px": list(reader.size), "mpp": reader.mpp, "features": features,
                "overlap_px2": round(overlap, 3), "overlap_share": overlap / total if total else 0.0,
                "agreement_in_tissue": float((drawn[tissue] == mask[tissue]).mean()),
                "simplify_um": config.inference.slide.regions_simplify_um,
                "min_area_um2": config.inference.slide.regions_min_area_um2}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slide", type=Path, help="the slide the outputs were predicted from")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder holding the slide's outputs")
    parser.add_argument("--config", type=Path, required=True, help="config of the prediction (tissue and region settings)")
    parser.add_argument("--retrace", action="store_true", help="trace the regions again from the mask first")
    args = parser.parse_args(argv)
    print(json.dumps(check(args.slide, args.out_dir, args.config, args.retrace)))


if __name__ == "__main__":
    main()
