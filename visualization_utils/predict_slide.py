"""Predict whole slides (any format OpenSlide reads) into pyramidal mask TIFFs, overview PNGs and area JSONs.

    python visualization_utils/predict_slide.py --config work_dirs/bcss/construct/config.yaml \
        --checkpoint work_dirs/bcss/construct/best.pth --gpu 0 slides/*.svs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from anywhere

from tqdm import tqdm

from construct.cli import run_cli
from construct.inference.slide import OVERVIEW_SIDE, SlideOutputs, open_slide, predict_slide
from visualization_utils.common import (
    add_inference_arguments,
    add_model_arguments,
    load,
    load_settings,
    make_predictor,
    positive_int,
)


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Segment whole slides with a trained ConStruct checkpoint, in memory that does not grow with "
        "the slide. Each slide is read at the model's resolution (data.mpp, 0.25 µm/px for BCSS-WSSS; change it "
        "with --opts data.mpp=...), tissue is found on a thumbnail so glass is skipped, tiles are predicted with "
        "overlap and the dense CRF runs window by window (inference.slide). Per slide it writes "
        "<name>_mask.tif (tiled pyramidal TIFF of class indices: the model's classes in label order, then "
        "background, e.g. 0=TUM 1=STR 2=LYM 3=NEC 4=BACK for BCSS-WSSS, with the class colours as its palette, on the slide's own pixel grid; opens in QuPath and OpenSlide viewers), "
        "<name>_overview.png (thumbnail, overlay, legend) and <name>_areas.json (tissue and class areas in mm²).")
    parser.add_argument("slides", nargs="+", type=Path, metavar="SLIDE",
                        help="slide files (.svs, .ndpi, .mrxs, .scn, tiled pyramidal .tif, ...: what OpenSlide reads)")
    add_model_arguments(parser)
    parser.add_argument("--mpp", type=positive_float, default=None, metavar="UM_PER_PX",
                        help="level-0 resolution (µm/px) of slides whose files do not state it; "
                        "a slide's own openslide.mpp-x always wins")
    parser.add_argument("--out-dir", type=Path, metavar="D",
                        help="output folder (default: <checkpoint dir>/slides)")
    parser.add_argument("--overview-side", type=positive_int, default=OVERVIEW_SIDE, metavar="PX",
                        help=f"longer side of the thumbnail and of the overlay in <name>_overview.png (default {OVERVIEW_SIDE})")
    add_inference_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> None:
    config, _ = load_settings(args)
    paths = args.slides[:args.max_images] if args.max_images else args.slides
    for path in paths:  # bad slides fail before any output or the model's loading
        open_slide(path, config, args.mpp).reader.close()
    out_dir = args.out_dir or args.checkpoint.parent / "slides"
    out_dir.mkdir(parents=True, exist_ok=True)  # an unwritable folder fails here, before any work
    config, model, device = load(args)
    with make_predictor(args, config, model, device) as predictor:
        for path in paths:
            slide = open_slide(path, config, args.mpp)
            width, height = slide.reader.size
            with slide.reader, tqdm(total=round(width * height / 1e6, 1), unit="MP", desc=path.name,
                                    dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.1f}/{total} MP "
                                    "[{elapsed}<{remaining}]") as bar:
                report = predict_slide(slide, predictor, out_dir, progress=lambda pixels: bar.update(pixels / 1e6),
                                       overview_side=args.overview_side)
            outputs = SlideOutputs.for_slide(out_dir, slide.reader.name)
            shares = ", ".join(f"{name} {100 * share:.1f}%" for name, share in report["fractions"].items())
            print(f"{path.name}: {report['tissue_mm2']:.2f} mm² tissue ({shares}); wrote {outputs.mask.name}, "
                  f"{outputs.overview.name}, {outputs.areas.name} to {out_dir}")


if __name__ == "__main__":
    run_cli(main, build_parser())
