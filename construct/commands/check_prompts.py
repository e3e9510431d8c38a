"""Check the class prompts against labelled data before training:
``construct-check-prompts --config configs/bcss.yaml``.

Zero-shot accuracy of the student (model.student.name; CONCH from model.conch.checkpoint: the real
weights or the testbed's tiny tower)
on the class regions of the val split, per class, with the confusion between classes and a
warning for each class CONCH places nearer another class's prompt (construct.inference.prompt_check
says how the regions are embedded and why it matters for L_sim).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from construct.atomic import write_text_atomic
from construct.classes import ClassSet
from construct.cli import add_device_arguments, resolve_device, run_cli
from construct.commands.common import positive_int
from construct.config import Config, load_config
from construct.data.datasets import EvalDataset, resize_image, split_folders
from construct.errors import ConfigError
from construct.inference.prompt_check import WARN_BELOW, check_prompts
from construct.models.build import load_student, student_checkpoint
from construct.models.student import Student


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Zero-shot accuracy of the class prompts (data.classes[].prompt) on the class regions of a "
        "labelled split, per class, with the confusion between classes; warns where CONCH places a class's "
        "regions nearer another prompt (then L_sim pulls that class's CAM the wrong way: rewrite the prompt or "
        "lower loss.sim_weight). Reads the student of model.student (CONCH: the real weights or the testbed's tiny tower).")
    parser.add_argument("--config", required=True, help="YAML config (its data and model sections are read)")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. data.root=/data/mine model.conch.checkpoint=/weights/conch.bin")
    parser.add_argument("--split", choices=("val", "test"), default="val", help="labelled split to use (default: val)")
    parser.add_argument("--min-share", type=float, default=0.1, metavar="F",
                        help="a class region must cover at least this share of its tile (default 0.1)")
    parser.add_argument("--views", choices=("image", "tokens"), default="image",
                        help="how a class region is embedded: 'image' = the tile with other pixels blacked out, through "
                        "CONCH's image encoder (default: the tissue alone); 'tokens' = the tile's last-block tokens pooled "
                        "with the region as weights (what L_sim sees with loss.sim_views: tokens, context included)")
    parser.add_argument("--warn-below", type=float, default=WARN_BELOW, metavar="F",
                        help=f"warn for a class whose zero-shot accuracy is below this (default {WARN_BELOW})")
    parser.add_argument("--max-images", type=positive_int, default=None, metavar="N", help="use only the first N images")
    parser.add_argument("--out", type=Path, default=None, metavar="JSON", help="also write the result as JSON")
    add_device_arguments(parser)
    return parser


def tile_batches(dataset: EvalDataset, tile: int, batch_size: int, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, masks) of the first ``count`` items at tile×tile (a tile of another size is resized;
    its mask by nearest neighbour, so class values stay exact)."""
    images, masks = [], []
    for index in tqdm(range(count), desc="prompt check", unit="img", dynamic_ncols=True, leave=False):
        item = dataset[index]
        image, mask = item["image"], item["mask"]
        if tuple(image.shape[-2:]) != (tile, tile):
            image = resize_image(image, tile)
            mask = F.interpolate(mask[None, None].float(), size=(tile, tile), mode="nearest")[0, 0].long()
        images.append(image)
        masks.append(mask)
        if len(images) == batch_size or index == count - 1:
            yield torch.stack(images), torch.stack(masks)
            images, masks = [], []


def load_configured_student(config: Config, device: torch.device) -> Student:
    """The student as build_model loads it (random weights from train.seed when its checkpoint is null)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        student = load_student(config)
    conch_cfg = config.model.conch
    if conch_cfg.normalization == "dataset":  # CONCH only (config validation)
        student.set_feature_normalization(conch_cfg.dataset_mean, conch_cfg.dataset_std)
    return student.to(device).eval()


def main(args: argparse.Namespace) -> None:
    device = resolve_device(args)
    config = load_config(args.config, args.opts)
    if not 0 < args.min_share <= 1:
        raise ConfigError(f"--min-share must lie in (0, 1], got {args.min_share}")
    classes = ClassSet.from_config(config)
    dataset = EvalDataset(config.data.root, args.split, classes, folders=split_folders(config))
    count = min(len(dataset), args.max_images or len(dataset))
    student = load_configured_student(config, device)
    views = args.views
    result = check_prompts(student, classes.prompts, classes.names,
                           tile_batches(dataset, config.model.image_size, config.inference.batch_size, count),
                           min_share=args.min_share, views=views)
    checkpoint = student_checkpoint(config)
    source = checkpoint or f"random weights (no checkpoint; train.seed {config.train.seed})"
    print(f"prompt check: {config.model.student.name} {source}, {config.data.name} {args.split} split, {result.images} images, class regions "
          f">= {100 * args.min_share:.0f}% of a tile, {views} views")
    print(result.format(args.warn_below))
    if args.out is not None:
        record = {"student": config.model.student.name, "checkpoint": checkpoint, "split": args.split, "images": result.images,
                  "views": views, "min_share": args.min_share, "classes": list(classes.names),
                  "prompts": list(classes.prompts), "confusion": result.confusion.tolist(),
                  "accuracy": {n: (None if not r else float(a)) for n, r, a in
                               zip(classes.names, result.regions, result.accuracy)},
                  "overall": result.overall,
                  "poorly_understood": [classes.names[c] for c in result.poorly_understood(args.warn_below)]}
        write_text_atomic(args.out, json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")


def cli() -> None:
    run_cli(main, build_parser())


if __name__ == "__main__":
    cli()
