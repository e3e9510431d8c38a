"""Evaluate a trained checkpoint on val/test: per-class IoU/Dice, mIoU, mDice, FwIoU, pixel accuracy (method.md §8).

    python visualization_utils/evaluate_performance.py --config configs/bcss.yaml \
        --checkpoint work_dirs/bcss/construct/best.pth --gpu 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from construct.atomic import write_text_atomic
from construct.cli import run_cli
from construct.commands.common import (
    add_inference_arguments,
    add_model_arguments,
    first,
    load_either_stage,
    load_settings,
    make_predictor,
)
from construct.data.check import check_config_data
from construct.data.datasets import eval_dataset
from construct.inference.evaluate import evaluate_split
from construct.inference.postprocess import PROTOCOLS
from construct.inference.segmenter import NO_GATING
from construct.metrics import BACKGROUND_CONVENTIONS
from construct.models.segmenter import Segmenter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Segment a labelled split with a trained ConStruct checkpoint and score the masks against the "
        "ground truth: a table per presence protocol and metrics_<split>_<protocol>.json beside the checkpoint. A "
        "stage-2 (segmenter) checkpoint is not gated by class presence: one table, metrics_<split>_stage2.json.")
    add_model_arguments(parser)
    parser.add_argument("--split", choices=("test", "val"), default="test", help="split to evaluate (default: test)")
    parser.add_argument("--protocol", choices=(*PROTOCOLS, "both"), default="both",
                        help="class presence that gates the CAMs: 'predicted' = sigmoid(logit) > inference.presence_gate "
                        "(honest), 'ground_truth' = classes in the GT mask (oracle, as the paper and PBIP report), or "
                        "'both' (default; the network runs once per image); stage-1 checkpoints only")
    parser.add_argument("--background", choices=BACKGROUND_CONVENTIONS, default=None,
                        help="ground-truth background in the metrics: 'counted' = a class of the (C+1)x(C+1) matrix, "
                        "left out of the mean (TPRO/PBIP/ConStruct), 'ignored' = GT background pixels left out "
                        "(WSSS-Tissue); default: evaluation.background of the config")
    add_inference_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="folder for the JSON files (default: the checkpoint's folder)")
    return parser


def main(args: argparse.Namespace) -> None:
    config, device = load_settings(args)
    # the checkpoint against the config first (a checkpoint of other classes or another student is
    # one line), then every image header and mask of the split: all problems before any prediction
    model = load_either_stage(config, args.checkpoint, device)
    check_config_data(config, [args.split], optional=(), progress=False).raise_if_problems()
    if args.background is not None:
        config = dataclasses.replace(config, evaluation=dataclasses.replace(config.evaluation, background=args.background))
    segmenter = isinstance(model, Segmenter)
    if segmenter:
        protocols: tuple[str, ...] = (NO_GATING,)
    else:
        protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    dataset = first(eval_dataset(config, args.split), args.max_images)
    with make_predictor(args, config, model, device) as predictor:
        results = evaluate_split(predictor, dataset, config, protocols, description=f"evaluate {args.split}")
    out_dir = args.out or args.checkpoint.parent
    for protocol, metrics in results.items():
        gating = ("stage-2 segmenter, no presence gating (it predicts every class and background itself; "
                  "--protocol does not apply)") if segmenter else f"presence protocol '{protocol}'"
        print(f"\n{config.data.name} {args.split} split, {len(dataset)} images, {gating}, "
              f"CRF {'on' if predictor.uses_crf else 'off'}, {predictor.tta.describe()}")
        print(metrics.format_table())
        record = {**metrics.to_dict(), "protocol": protocol, "stage": 2 if segmenter else 1, "split": args.split,
                  "checkpoint": str(args.checkpoint), "config": str(args.config), "dataset": config.data.name,
                  "crf": predictor.uses_crf, "tta": predictor.tta.record(), "images": len(dataset)}
        suffix = "" if metrics.background == "counted" else f"_background-{metrics.background}"
        path = out_dir / f"metrics_{args.split}_{'stage2' if segmenter else protocol}{suffix}.json"
        write_text_atomic(path, json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")


def cli() -> None:
    run_cli(main, build_parser())


if __name__ == "__main__":
    cli()
