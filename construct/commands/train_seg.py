"""Stage 2: train a segmenter on a stage-1 run's pseudo-masks, ``construct-train-seg --config configs/bcss.yaml``.

The config is stage 1's (its ``stage2`` section holds the segmenter's settings), so the same file
drives both stages: ``python main.py --config X`` and then ``construct-train-seg --config X``.
"""

from __future__ import annotations

import argparse

from construct.cli import add_device_arguments, resolve_device, run_cli
from construct.config import load_config
from construct.engine.distributed import cleanup, init_distributed
from construct.engine.segmenter_trainer import stage2_work_dir, train_segmenter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Stage 2: train a SegFormer (stage2.preset, encoder from the teacher's MiT weights) on the "
        "pseudo-masks of a stage-1 checkpoint (stage2.checkpoint, default <work_dir>/best.pth): its predictions "
        "on the train split, gated by each tile's labels, with the config's TTA and CRF, cached beside it in "
        "pseudo_masks/<hash of the checkpoint and settings>/. Writes config.yaml, "
        "latest.pth, best.pth (highest validation mIoU) and log.jsonl to stage2.work_dir (default "
        "<work_dir>/stage2); every inference command accepts its best.pth. Multi-GPU: "
        "torchrun --nproc_per_node=N -m construct.commands.train_seg --config ...",
    )
    parser.add_argument("--config", required=True, help="YAML config of the stage-1 run (see configs/ and docs/config.md)")
    parser.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                        help="continue from a stage-2 checkpoint (default PATH: <stage2 work dir>/latest.pth)")
    parser.add_argument("--overwrite", action="store_true", help="start again in a stage-2 work dir that already holds a run")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. stage2.iterations=4000 stage2.preset=mit_b2")
    add_device_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> None:
    config = load_config(args.config, args.opts)
    resume = args.resume
    if resume == "auto":
        resume = stage2_work_dir(config) / "latest.pth"
    dist_info = init_distributed(resolve_device(args))
    try:
        result = train_segmenter(config, dist_info, resume=resume, overwrite=args.overwrite)
    finally:
        cleanup(dist_info)
    if dist_info.is_main:
        print(f"done: {result.iterations} iterations; best val mIoU {result.best_miou:.2f} at iteration "
              f"{result.best_iteration}; checkpoints in {result.work_dir}")


def cli() -> None:
    run_cli(main, build_parser())


if __name__ == "__main__":
    cli()
