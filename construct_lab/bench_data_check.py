"""Time the data check (construct.data.check) on a dataset of BCSS-WSSS's size.

    python -m construct_lab.bench_data_check --out /tmp/bcss_sized

Writes a synthetic dataset with BCSS-WSSS's split sizes (23,422 train, 3,418 val, 4,986 test tiles
of 224 px; labels in the file names, palette PNG masks) unless ``--out`` already holds one, then
runs the check as training does and prints its time with the machine. The tiles are copies of a
pool of distinct synthetic tiles (drawing 31,826 tiles would take long and measure the painter, not
the check); each copy is its own file, of the usual size (~110 kB).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from construct.classes import ClassSet
from construct.cli import run_cli
from construct.config import load_config
from construct.data.check import check_config_data
from construct_lab.paths import REPO
from construct_lab.synthetic.tiles import generate_dataset

BCSS_SIZES = {"train": 23_422, "val": 3_418, "test": 4_986}
POOL = 64


def write_dataset(out: Path, sizes: dict[str, int], classes: ClassSet) -> float:
    """Copies of a pool of synthetic tiles under ``out`` in the BCSS-WSSS layout; returns seconds taken."""
    started = time.perf_counter()
    pool = out.parent / f".{out.name}-pool"
    shutil.rmtree(pool, ignore_errors=True)
    generate_dataset(pool, POOL, POOL, POOL, seed=0, classes=classes)
    train_pool = sorted((pool / "train").glob("*.png"))
    for index in range(sizes["train"]):
        source = train_pool[index % POOL]
        label = source.name[source.name.rindex("["):]
        target = out / "train" / f"tile{index:06d}+0{label}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    for split in ("val", "test"):
        images = sorted((pool / split / "img").glob("*.png"))
        for part in ("img", "mask"):
            (out / split / part).mkdir(parents=True, exist_ok=True)
        for index in range(sizes[split]):
            source = images[index % POOL]
            shutil.copyfile(source, out / split / "img" / f"{split}{index:06d}.png")
            shutil.copyfile(source.parent.parent / "mask" / source.name, out / split / "mask" / f"{split}{index:06d}.png")
    shutil.rmtree(pool)
    return time.perf_counter() - started


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(args: argparse.Namespace) -> None:
    config = load_config(REPO / "configs" / "bcss.yaml", [f"data.root={args.out}"])
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    if not (args.out / "train").is_dir():
        seconds = write_dataset(args.out, sizes, ClassSet.from_config(config))
        print(f"wrote {sum(sizes.values()):,} tiles to {args.out} in {seconds:.0f} s")
    torch.set_num_threads(1)
    started = time.perf_counter()
    report = check_config_data(config)
    elapsed = time.perf_counter() - started
    print(report.summary())
    print(f"data check: {elapsed:.1f} s for {sum(s.tiles for s in report.splits.values()):,} tiles "
          f"({cpu_name()}, {os.cpu_count()} cores visible, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m construct_lab.bench_data_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="dataset folder (written when it holds none)")
    for split, count in BCSS_SIZES.items():
        parser.add_argument(f"--{split}", type=int, default=count, help=f"{split} tiles (default {count:,})")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser())
