"""Peak memory and speed of whole-slide prediction on synthetic slides of several sizes, in docs/benchmarks.md.

    python -m construct_lab.bench_slide                               # slides of 12000², 6000², 3000² px, CPU
    python -m construct_lab.bench_slide --sizes 20000,10000 --regions 4096 --no-write

Each slide size is written as a tiled pyramidal TIFF at 0.25 µm/px (:mod:`construct_lab.synthetic.slide`,
~44% tissue) and predicted by ``predict_slide`` in its own process (GeoJSON of the class regions
included); the GeoJSON step is then run once more on its own, from the finished mask TIFF, in a
process of its own, so that its memory shows apart from the prediction's; each region size is an
in-memory synthetic image predicted like ``generate_cam.py --input-dir`` does (``predict_region``).
The model is the tiny demo model (random weights: memory and time do not depend on weight values),
CRF on, TTA off. While a prediction runs, the resident memory of its process and of its CRF
workers is summed every 0.1 s; the peak of that sum is the figure reported. If memory does not
grow with the slide, the peaks are about equal. Nothing here is a test: the numbers depend on
the machine (and on what else runs there), which the report names.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from construct_lab.paths import REPO

REPORT = REPO / "docs" / "benchmarks.md"
HEADING = "Whole slides (CPU"
STAGES_HEADING = "Stage 1 against stage 2 on a slide (CPU"
MPP = 0.25
DEFAULT_SIZES = "12000,6000,3000"
DEFAULT_REGIONS = "4096,2048"


def tiny_predictor(workers: int):
    """The tiny demo model with random weights, CRF on, TTA off."""
    import torch

    from construct.config import load_config
    from construct.inference.predictor import Predictor
    from construct.models.build import build_model

    config = load_config(REPO / "configs" / "demo_random.yaml", [f"data.mpp={MPP}"])
    torch.manual_seed(0)
    return Predictor(build_model(config).eval(), config, torch.device("cpu"), tta=False, crf=True, workers=workers)


def real_size_predictor(model: str, workers: int):
    """Random real-size weights: 'stage1' = CONCH ViT-B/16 + adapters with the default TTA and CRF;
    'stage2' = the SegFormer-B1 segmenter with its defaults (no flip, no CRF)."""
    import torch

    from construct.config import load_config
    from construct.inference.predictor import Predictor
    from construct.inference.segmenter import SegmenterPredictor
    from construct.models.build import build_model
    from construct.models.segmenter import architecture_for, build_segmenter

    config = load_config(REPO / "configs" / "bcss.yaml", [f"data.mpp={MPP}", "model.conch.checkpoint=null",
                                                          "model.teacher.checkpoint=null"])
    torch.manual_seed(0)
    if model == "stage1":
        return Predictor(build_model(config).eval(), config, torch.device("cpu"), workers=workers)
    segmenter = build_segmenter(architecture_for(len(config.data.classes), "segformer", "mit_b1"))
    return SegmenterPredictor(segmenter, config, torch.device("cpu"), workers=workers)


def predict_slide_file(slide: Path, out_dir: Path, workers: int, model: str = "tiny") -> dict[str, Any]:
    """Child process: predict ``slide`` into ``out_dir`` with ``model`` ('tiny', 'stage1', 'stage2'); what
    predict_slide reports."""
    from construct.inference.slide import open_slide, predict_slide

    with (tiny_predictor(workers) if model == "tiny" else real_size_predictor(model, workers)) as predictor:
        opened = open_slide(slide, predictor.config)
        with opened.reader:
            report = predict_slide(opened, predictor, out_dir)
    report["main_process_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


def trace_mask_regions(mask: Path) -> dict[str, Any]:
    """Child process: the GeoJSON step alone, from a finished mask TIFF, with the default settings."""
    from construct.classes import ClassSet
    from construct.config import load_config
    from construct.inference.regions import write_regions
    from construct.inference.slide import region_settings

    config = load_config(REPO / "configs" / "demo_random.yaml", [f"data.mpp={MPP}"])
    imports_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the package's imports (torch)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        summary = write_regions(mask, Path(scratch) / "regions.geojson", ClassSet.from_config(config), MPP,
                                region_settings(config))
        seconds = time.perf_counter() - started
        size = (Path(scratch) / "regions.geojson").stat().st_size
    return {"seconds": seconds, "features": summary.features, "mask_level": summary.level, "bytes": size,
            "imports_peak_mib": imports_peak, "main_process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def predict_synthetic_region(side: int, workers: int) -> dict[str, Any]:
    """Child process: a side × side synthetic region (all tissue texture) through ``predict_region``."""
    import numpy as np

    from construct.inference.streaming import predict_region
    from construct_lab.synthetic.slide import SyntheticSlide

    # The slide's centre is tissue; a region cut from it, as generate_cam --input-dir receives them.
    slide = SyntheticSlide(4 * side, 4 * side)
    image = slide.pixels(np.arange(side) + int(1.5 * side), np.arange(side) + int(1.5 * side))
    with tiny_predictor(workers) as predictor:
        started = time.perf_counter()
        predict_region(predictor, image, "region")
        seconds = time.perf_counter() - started
    return {"size_px": [side, side], "seconds": seconds,
            "main_process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the process ended meanwhile
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue.extend(parents.get(pid, []))
    return tree


def resident_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
        except OSError:
            continue
        total += int(match.group(1)) * 1024 if match else 0
    return total


def run_measured(child_args: list[str], workers: int, model: str = "tiny") -> dict[str, Any]:
    """Run a child mode while sampling its process tree's resident memory; adds the peak and the time."""
    command = [sys.executable, "-m", "construct_lab.bench_slide", *child_args, "--workers", str(workers),
               "--child-model", model]
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, resident_bytes(process_tree(child.pid)))
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = child.communicate()
    stop.set()
    sampler.join()
    if child.returncode:
        raise SystemExit(f"{' '.join(child_args)} failed (exit {child.returncode})")
    result = json.loads(output.strip().splitlines()[-1])
    result["tree_peak_mib"] = peak / 2**20
    result["wall_seconds"] = time.perf_counter() - started
    return result


def machine_description() -> str:
    import platform

    import torch

    cpu = platform.machine()
    match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    if match:
        cpu = match.group(1).strip()
    return f"{cpu} ({platform.machine()}), {os.cpu_count()} cores visible, torch {torch.__version__}"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def render_section(slides: list[dict[str, Any]], regions: list[dict[str, Any]], workers: int, command: str,
                   loads: tuple[str, str]) -> str:
    today = datetime.date.today().isoformat()
    lines = [
        f"## {HEADING}, tiny model)",
        "",
        f"Measured {today} on: {machine_description()}; `{command}`. Load average (1, 5, 15 min) at the start",
        f"{loads[0]}, at the end {loads[1]}: other work shared the 2 cores, so times are upper bounds.",
        "The tiny demo model (random weights), CRF on (" + f"{workers} workers, windows of 512 + 2 × 48 px), TTA off.",
        "Peak memory is the resident memory of the prediction process plus its CRF workers, summed and sampled",
        "every 0.1 s (in brackets: the main process alone, its exact peak).",
        "",
    ]
    if slides:
        lines += [
            "Slides (`predict_slide`): synthetic pyramidal TIFFs at 0.25 µm/px, ~44% tissue. Seconds per megapixel",
            "count every pixel of the slide, glass included: the prediction with its outputs, and (total) the whole",
            "run with start-up and model loading. GeoJSON: the class regions step (default settings), its seconds",
            "inside the run, and run alone from the finished mask in a fresh process: its peak memory and, in",
            "brackets, that process's peak before the step (Python and the package's imports, torch among them).",
            "",
            "| slide (px) | megapixels | tissue (mm²) | tiles | peak memory | s / megapixel | total "
            "| GeoJSON: regions, mask level | in the run | alone: peak memory, time |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in slides:
            width, height = row["size_px"]
            megapixels = width * height / 1e6
            alone = row["regions_alone"]
            lines.append(f"| {width} × {height} | {megapixels:.0f} | {row['tissue_mm2']:.2f} | {row['tiles']:,} | "
                         f"{row['tree_peak_mib'] / 1024:.2f} GiB ({row['main_process_peak_mib'] / 1024:.2f} GiB) | "
                         f"{row['seconds'] / megapixels:.2f} | {row['wall_seconds'] / 60:.1f} min | "
                         f"{alone['features']:,}, level {alone['mask_level']} ({alone['bytes'] / 2**20:.1f} MiB) | "
                         f"{row['regions']['seconds']:.1f} s | {alone['tree_peak_mib']:.0f} MiB ({alone['imports_peak_mib']:.0f} MiB), "
                         f"{alone['seconds']:.1f} s |")
        big, small = slides[0], slides[-1]
        ratio = (big["size_px"][0] * big["size_px"][1]) / (small["size_px"][0] * small["size_px"][1])
        lines += ["", f"{ratio:.0f}× the area, {big['tree_peak_mib'] / small['tree_peak_mib']:.2f}× the peak memory.", ""]
    if regions:
        lines += [
            "Regions (`predict_region`, the path of `generate_cam.py --input-dir`): synthetic all-tissue RGB images",
            "held in memory (3 bytes per pixel of the input are part of the figure).",
            "",
            "| region (px) | megapixels | peak memory | s / megapixel |",
            "|---|---|---|---|",
        ]
        for row in regions:
            megapixels = row["size_px"][0] * row["size_px"][1] / 1e6
            lines.append(f"| {row['size_px'][0]} × {row['size_px'][1]} | {megapixels:.1f} | "
                         f"{row['tree_peak_mib'] / 1024:.2f} GiB ({row['main_process_peak_mib'] / 1024:.2f} GiB) | "
                         f"{row['seconds'] / megapixels:.2f} |")
        lines.append("")
    return "\n".join(lines)


def render_stages(rows: dict[str, dict[str, Any]], workers: int, command: str, loads: tuple[str, str]) -> str:
    """The section comparing stage 1's default slide path with stage 2's, real-size models."""
    today = datetime.date.today().isoformat()
    stage1, stage2 = rows["stage1"], rows["stage2"]
    width, height = stage1["size_px"]
    megapixels = width * height / 1e6
    lines = [
        f"## {STAGES_HEADING}, real-size models)",
        "",
        f"Measured {today} on: {machine_description()}; `{command}`. Load average (1, 5, 15 min) at the start",
        f"{loads[0]}, at the end {loads[1]}: other work shared the cores, so times are upper bounds.",
        f"One synthetic {width} × {height} px slide at 0.25 µm/px (~44% tissue), predicted by `predict_slide` with",
        "random real-size weights (speed and memory do not depend on weight values). Stage 1: CONCH ViT-B/16 +",
        f"adapters with its defaults, TTA intensity ×3 + flip (6 passes) and the dense CRF ({workers} workers);",
        "stage 2: the SegFormer-B1 segmenter with its defaults, one pass, no CRF. Tiles of 224 px every 112 px",
        "for both. Peak memory as in the section above (prediction process plus CRF workers; in brackets the",
        "main process alone).",
        "",
        "| model | tiles | peak memory | s / megapixel | total |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("stage1", "stage 1 (CAMs, TTA + CRF)"), ("stage2", "stage 2 (SegFormer-B1)")):
        row = rows[name]
        lines.append(f"| {label} | {row['tiles']:,} | {row['tree_peak_mib'] / 1024:.2f} GiB "
                     f"({row['main_process_peak_mib'] / 1024:.2f} GiB) | {row['seconds'] / megapixels:.2f} | "
                     f"{row['wall_seconds'] / 60:.1f} min |")
    lines += ["", f"Stage 2 is {stage1['seconds'] / stage2['seconds']:.1f}× faster per megapixel than stage 1's default.", ""]
    return "\n".join(lines)


def update_report(section: str, heading: str = HEADING) -> None:
    """Replace this benchmark's section of docs/benchmarks.md (other sections stay)."""
    text = REPORT.read_text(encoding="utf-8") if REPORT.exists() else "# Benchmarks\n\n"
    pattern = re.compile(rf"^## {re.escape(heading)}.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    REPORT.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"square slide sides in px, largest first (default {DEFAULT_SIZES}; "
                        "empty: none)")
    parser.add_argument("--regions", default=DEFAULT_REGIONS, help=f"square region sides in px (default {DEFAULT_REGIONS}; "
                        "empty: none)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CRF worker processes (default: all cores)")
    parser.add_argument("--stages", type=int, metavar="SIDE",
                        help="instead: one SIDE x SIDE slide predicted by stage 1 (default TTA + CRF) and by stage 2 "
                        "(SegFormer-B1), real-size random weights, in their own section")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of updating docs/benchmarks.md")
    parser.add_argument("--child-model", default="tiny", choices=("tiny", "stage1", "stage2"), help=argparse.SUPPRESS)
    parser.add_argument("--child-slide", nargs=2, metavar=("SLIDE", "OUT_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--child-region", type=int, metavar="SIDE", help=argparse.SUPPRESS)
    parser.add_argument("--child-regions", type=Path, metavar="MASK", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_slide:
        print(json.dumps(predict_slide_file(Path(args.child_slide[0]), Path(args.child_slide[1]), args.workers,
                                            args.child_model)))
        return
    if args.child_regions:
        print(json.dumps(trace_mask_regions(args.child_regions)))
        return
    if args.child_region:
        print(json.dumps(predict_synthetic_region(args.child_region, args.workers)))
        return
    from construct_lab.synthetic.slide import write_synthetic_slide

    if args.stages:
        compare_stages(args.stages, args.workers, args.no_write)
        return
    loads = [load_average()]
    slides, regions = [], []
    with tempfile.TemporaryDirectory(prefix="bench_slide_") as scratch:
        for side in (int(s) for s in args.sizes.split(",") if s):
            slide = Path(scratch) / f"synthetic_{side}.tif"
            started = time.perf_counter()
            write_synthetic_slide(slide, side, side, mpp=MPP)
            print(f"{slide.name}: written in {time.perf_counter() - started:.0f} s "
                  f"({slide.stat().st_size / 2**20:.0f} MiB); predicting ...", flush=True)
            out_dir = Path(scratch) / f"out_{side}"
            slides.append(run_measured(["--child-slide", str(slide), str(out_dir)], args.workers))
            print(f"  peak {slides[-1]['tree_peak_mib']:.0f} MiB, {slides[-1]['wall_seconds']:.0f} s; GeoJSON alone ...",
                  flush=True)
            slides[-1]["regions_alone"] = run_measured(["--child-regions", str(out_dir / f"{slide.stem}_mask.tif")],
                                                       args.workers)
            print(f"  peak {slides[-1]['regions_alone']['tree_peak_mib']:.0f} MiB, "
                  f"{slides[-1]['regions_alone']['seconds']:.1f} s", flush=True)
            slide.unlink()
    for side in (int(s) for s in args.regions.split(",") if s):
        print(f"region {side}² ...", flush=True)
        regions.append(run_measured(["--child-region", str(side)], args.workers))
        print(f"  peak {regions[-1]['tree_peak_mib']:.0f} MiB, {regions[-1]['wall_seconds']:.0f} s", flush=True)
    loads.append(load_average())
    command = "python -m construct_lab.bench_slide"
    if args.sizes != DEFAULT_SIZES or args.regions != DEFAULT_REGIONS:
        command += f" --sizes {args.sizes} --regions {args.regions}"
    section = render_section(slides, regions, args.workers, command, tuple(loads))
    if args.no_write:
        print(section)
    else:
        update_report(section)
        print(f"updated {REPORT}")


def compare_stages(side: int, workers: int, no_write: bool) -> None:
    """One slide through stage 1 and stage 2 (real-size random weights), each in its own measured process."""
    from construct_lab.synthetic.slide import write_synthetic_slide

    loads = [load_average()]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench_stages_") as scratch:
        slide = Path(scratch) / f"synthetic_{side}.tif"
        write_synthetic_slide(slide, side, side, mpp=MPP)
        for model in ("stage2", "stage1"):
            print(f"{slide.name}: {model} ...", flush=True)
            rows[model] = run_measured(["--child-slide", str(slide), str(Path(scratch) / f"out_{model}")], workers, model)
            print(f"  peak {rows[model]['tree_peak_mib']:.0f} MiB, {rows[model]['wall_seconds']:.0f} s", flush=True)
    loads.append(load_average())
    section = render_stages(rows, workers, f"python -m construct_lab.bench_slide --stages {side}", tuple(loads))
    if no_write:
        print(section)
    else:
        update_report(section, STAGES_HEADING)
        print(f"updated {REPORT}")


if __name__ == "__main__":
    main()
