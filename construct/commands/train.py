"""Train ConStruct (one stage) from a YAML config: ``construct-train --config configs/bcss.yaml --gpu 0``.

``python main.py`` runs the same command after the lab has made what a config's ``testbed``
section asks for (synthetic tiles, tiny towers); this command itself reads only data.root and the
weight files.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from construct.cli import add_device_arguments, resolve_device, run_cli
from construct.config import Config, load_config
from construct.engine.distributed import DistInfo, cleanup, init_distributed
from construct.engine.trainer import train

Prepare = Callable[[Config, DistInfo], None]
"""Makes a config's inputs before training (the lab's testbed); called on every process."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train ConStruct with image-level labels. Writes config.yaml, latest.pth, best.pth and "
        "log.jsonl to the config's work_dir. Multi-GPU: torchrun --nproc_per_node=N main.py --config ...",
    )
    parser.add_argument("--config", required=True, help="YAML config file (see configs/ and docs/config.md)")
    parser.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                        help="continue from a checkpoint (default PATH: <work_dir>/latest.pth)")
    parser.add_argument("--overwrite", action="store_true", help="start again in a work_dir that already holds a run")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. train.batch_size=4 data.root=/data/BCSS-WSSS")
    add_device_arguments(parser)
    return parser


def main(args: argparse.Namespace, prepare: Prepare | None = None) -> None:
    config = load_config(args.config, args.opts)
    resume = args.resume
    if resume == "auto":
        resume = f"{config.work_dir}/latest.pth"
    dist_info = init_distributed(resolve_device(args))
    try:
        if prepare is not None:
            prepare(config, dist_info)
        result = train(config, dist_info, resume=resume, overwrite=args.overwrite)
    finally:
        cleanup(dist_info)
    if dist_info.is_main:
        print(f"done: {result.iterations} iterations; best val mIoU {result.best_miou:.2f} at iteration "
              f"{result.best_iteration}; checkpoints in {result.work_dir}")


def cli() -> None:
    run_cli(main, build_parser())


if __name__ == "__main__":
    cli()
