"""Predict whole slides (any format OpenSlide reads) into pyramidal masks (class indices, and class colours for
QuPath), overview PNGs, region GeoJSONs, area JSONs and a cohort table; one bad slide does not stop the rest, ``--skip-existing`` resumes.

    python visualization_utils/predict_slide.py --config work_dirs/bcss/construct/config.yaml \
        --checkpoint work_dirs/bcss/construct/best.pth --gpu 0 slides/*.svs
    torchrun --nproc_per_node=8 visualization_utils/predict_slide.py --config ... --checkpoint ... slides/*.svs
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from construct.classes import ClassSet
from construct.cli import run_cli
from construct.commands.common import (
    add_inference_arguments,
    add_model_arguments,
    load_either_stage,
    load_settings,
    make_predictor,
    positive_int,
)
from construct.data.slide_reader import require_slide_file
from construct.engine.distributed import all_gather_objects, barrier, broadcast_object, cleanup, init_distributed
from construct.inference.cohort import (
    DONE,
    FAILED,
    SKIPPED,
    CohortJob,
    check_unique_names,
    run_slides,
    slide_area,
    split_by_area,
    write_cohort_table,
)
from construct.inference.slide import OVERVIEW_SIDE

COHORT_WAIT = datetime.timedelta(days=7)
"""How long a rank that has finished its slides waits for the others (the table is merged after the last)."""


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
        "<name>_mask.tif (tiled pyramidal TIFF of class indices for analysis: the model's classes in label order, "
        "then background, e.g. 0=TUM 1=STR 2=LYM 3=NEC 4=BACK for BCSS-WSSS, with the class colours as its "
        "palette), <name>_mask_rgb.ome.tif (the class colours as a pyramidal OME-TIFF: open this one in QuPath), "
        "<name>_overview.png (thumbnail, overlay, legend), <name>_regions.geojson (each connected class region as "
        "a QuPath annotation with its area, the regions tiling the tissue; inference.slide.regions_*) and "
        "<name>_areas.json (tissue and class "
        "areas in mm², written last: it marks complete outputs). Masks and regions are in the pixels of the "
        "slide's scanned area as QuPath shows it (openslide.bounds-* where the slide states them, e.g. MIRAX). "
        "For all slides cohort.csv and cohort.json "
        "(a row per slide: status, error, areas, tiles, seconds, checkpoint, config). A slide that cannot be "
        "opened or predicted gets one error line and a failed row, the others go on, and the exit status is 1. "
        "Under torchrun (--nproc_per_node=N, any number of nodes) the ranks split the slides by area, each on "
        "the GPU of its LOCAL_RANK, and rank 0 writes the table once all have finished.")
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
    parser.add_argument("--no-regions", action="store_true",
                        help="do not write <name>_regions.geojson (the class regions as QuPath annotations)")
    parser.add_argument("--skip-existing", action="store_true",
                        help="leave out slides whose outputs in --out-dir are complete (rerun a stopped cohort to resume it)")
    add_inference_arguments(parser)
    return parser


def progress_bars(prefix: str) -> Callable[[Path, tuple[int, int]], contextlib.AbstractContextManager]:
    """A tqdm bar per slide, in megapixels of the slide, named ``prefix`` + the slide's file name."""

    @contextlib.contextmanager
    def bar(path: Path, size: tuple[int, int]) -> Iterator[Callable[[int], None]]:
        with tqdm(total=size[0] * size[1] / 1e6, unit="MP", desc=prefix + path.name, dynamic_ncols=True,
                  bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} MP [{elapsed}<{remaining}]") as progress:
            yield lambda pixels: progress.update(pixels / 1e6)

    return bar


def main(args: argparse.Namespace) -> None:
    config, device = load_settings(args)
    paths = args.slides[:args.max_images] if args.max_images else args.slides
    for path in paths:  # before the model is loaded: a folder or a typo is no slide
        require_slide_file(path)
    check_unique_names(paths)
    out_dir = args.out_dir or args.checkpoint.parent / "slides"
    out_dir.mkdir(parents=True, exist_ok=True)  # an unwritable folder fails here, before any work
    # Ranks exchange only the plan and the rows (gloo, even on GPUs), and wait long for the slowest.
    info = init_distributed(device, backend="gloo", timeout=COHORT_WAIT)
    try:
        if info.enabled and args.workers is None:  # the ranks of a node share its cores for the CRF
            args.workers = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if info.enabled:
            plan = broadcast_object(info, split_by_area([slide_area(p) for p in paths], info.world_size)
                                    if info.is_main else None)
        else:
            plan = [list(range(len(paths)))]
        classes = ClassSet.from_config(config)
        provenance = {"checkpoint": str(args.checkpoint.absolute()), "config": str(Path(args.config).absolute()),
                      "config_overrides": list(args.opts)}
        job = CohortJob(config=config, out_dir=out_dir, classes=classes, mpp=args.mpp, regions=not args.no_regions,
                        skip_existing=args.skip_existing, overview_side=args.overview_side,
                        provenance=provenance, show_tracebacks=args.debug)

        def load_predictor():
            model = load_either_stage(config, args.checkpoint, info.device)
            return make_predictor(args, config, model, info.device)

        mine = plan[info.rank]
        prefix = f"[rank {info.rank}] " if info.enabled else ""
        rows = run_slides([paths[i] for i in mine], job, load_predictor, progress=progress_bars(prefix),
                          log=lambda line: print(prefix + line, flush=True))
        ranked = all_gather_objects(info, list(zip(mine, rows)))
        table = [row for _, row in sorted(pair for pairs in ranked for pair in pairs)]
        if info.is_main:
            written = write_cohort_table(table, out_dir, classes)
            counts = {status: sum(row["status"] == status for row in table) for status in (DONE, SKIPPED, FAILED)}
            print(f"cohort: {counts[DONE]} predicted, {counts[SKIPPED]} skipped, {counts[FAILED]} failed of "
                  f"{len(table)} slides; wrote {', '.join(p.name for p in written)} to {out_dir}")
        barrier(info)  # torchrun stops all ranks when one exits with an error: not before the table is written
    finally:
        cleanup(info)
    if info.is_main and any(row["status"] == FAILED for row in table):
        raise SystemExit(1)  # rank 0 carries the cohort's status (torchrun exits 1 with it)


def cli() -> None:
    run_cli(main, build_parser())


if __name__ == "__main__":
    cli()
