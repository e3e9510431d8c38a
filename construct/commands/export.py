"""Write predicted masks (palette PNGs), optionally CAMs and colour overlays, for a split or a folder of images.

    python visualization_utils/generate_cam.py --config configs/bcss.yaml \
        --checkpoint work_dirs/bcss/construct/best.pth --split train --gpu 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from construct.atomic import atomic_path, write_text_atomic
from construct.classes import ClassSet
from construct.cli import run_cli
from construct.commands.common import (
    add_inference_arguments,
    add_model_arguments,
    first,
    load,
    make_predictor,
    presence_of,
    split_dataset,
)
from construct.data.datasets import ImageFolderDataset, collate_same_size, same_size_batches
from construct.data.io import read_image, write_image, write_mask
from construct.inference.predictor import Predictor, to_uint8_images
from construct.inference.render import overlay
from construct.inference.segmenter import NO_GATING
from construct.inference.streaming import predict_region
from construct.models.segmenter import Segmenter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Predict a mask for every image of a split or folder with a trained ConStruct checkpoint. "
        "Masks are palette PNGs in the dataset's mask values and colours (BCSS-WSSS: 0=TUM 1=STR 2=LYM 3=NEC "
        "4=BACK) named like the inputs; a generate_cam.json beside them records the classes, presence protocol, "
        "checkpoint and settings.")
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", choices=("test", "val", "train"),
                        help="dataset split under data.root. train: CAMs are gated with each tile's image-level "
                        "label, giving the pseudo-masks a second-stage segmenter trains on; val/test: gated as "
                        "inference.presence says (a stage-2 checkpoint is never gated)")
    source.add_argument("--input-dir", type=Path, metavar="DIR",
                        help="folder of images of any size >= model.image_size, streamed like a whole slide: tiles "
                        "every inference.tile_stride px, each gated with its own predicted presence, and the CRF in "
                        "inference.slide.window windows, so memory beyond the image and its mask does not grow with its area")
    parser.add_argument("--out-dir", type=Path, metavar="D",
                        help="output folder (default: <checkpoint dir>/<split>_cams or <checkpoint dir>/<input-dir name>_cams)")
    parser.add_argument("--save-cam", action="store_true",
                        help="also write cam/<name>.npy: the normalised, presence-gated CAMs the mask was computed "
                        "from (float16, C x H x W in the dataset's class order, values 0-1; with --input-dir, gated and "
                        "normalised per tile and averaged where tiles overlap). A stage-2 checkpoint has no CAMs: "
                        "it writes the segmenter's softmax probability of each tissue class instead (same layout; "
                        "background's is 1 minus their sum)")
    parser.add_argument("--overlay", action="store_true",
                        help="also write overlay/<name>.png: the image blended with the palette colours of its mask")
    add_inference_arguments(parser)
    return parser


def save_outputs(out_dir: Path, name: str, image: np.ndarray, mask: np.ndarray, cams: np.ndarray | None,
                 save_overlay: bool, classes: ClassSet) -> None:
    write_mask(out_dir / f"{name}.png", mask, classes)
    if cams is not None:
        with atomic_path(out_dir / "cam" / f"{name}.npy") as tmp, open(tmp, "wb") as handle:
            np.save(handle, cams.astype(np.float16))
    if save_overlay:
        write_image(out_dir / "overlay" / f"{name}.png", overlay(image, mask, classes))


def predict_split(predictor: Predictor, dataset: Dataset, protocol: str, num_workers: int, out_dir: Path,
                  args: argparse.Namespace, progress: tqdm) -> None:
    """Split images in batches of one size each; every image is predicted at its own size."""
    loader = DataLoader(dataset, batch_size=predictor.config.inference.batch_size, num_workers=num_workers,
                        collate_fn=collate_same_size)
    for batch in same_size_batches(loader):
        predictions = predictor.predict_batch(batch["image"], presence_of(batch), protocol, batch["name"])
        for name, image, prediction in zip(batch["name"], to_uint8_images(batch["image"]), predictions):
            save_outputs(out_dir, name, image, prediction.mask, prediction.cams if args.save_cam else None, args.overlay,
                         predictor.classes)
        progress.update(len(predictions))


def predict_folder(predictor: Predictor, paths: list[Path], out_dir: Path, args: argparse.Namespace,
                   progress: tqdm) -> None:
    """Images of any size, one at a time through the streaming (whole-slide) path."""
    for path in paths:
        image = read_image(path)
        mask, cams = predict_region(predictor, image, path.stem, keep_cams=args.save_cam)
        save_outputs(out_dir, path.stem, image, mask, cams, args.overlay, predictor.classes)
        progress.update(1)


def main(args: argparse.Namespace) -> None:
    config, model, device = load(args)
    segmenter = isinstance(model, Segmenter)
    if args.input_dir is not None:
        paths, protocol, source = ImageFolderDataset(args.input_dir).paths[:args.max_images], "predicted", args.input_dir.name
        count = len(paths)
    else:
        (dataset, protocol), source = split_dataset(config, args.split), args.split
        dataset = first(dataset, args.max_images)
        count = len(dataset)
    out_dir = args.out_dir or args.checkpoint.parent / f"{source}_cams"
    with make_predictor(args, config, model, device) as predictor, \
            tqdm(total=count, desc=f"masks for {source}", unit="img", dynamic_ncols=True) as progress:
        if args.input_dir is not None:
            predict_folder(predictor, paths, out_dir, args, progress)
        else:
            predict_split(predictor, dataset, protocol, config.data.num_workers, out_dir, args, progress)
    classes = predictor.classes
    info = {"source": str(args.input_dir or args.split), "dataset": config.data.name,
            "classes": {name: {"mask_value": value, "color": list(rgb)}
                        for name, value, rgb in zip(classes.all_names, classes.mask_values, classes.palette)},
            "cam_channels": list(classes.names), "cam_values": "class probabilities" if segmenter else "gated CAMs",
            "stage": 2 if segmenter else 1, "protocol": NO_GATING if segmenter else protocol, "checkpoint": str(args.checkpoint),
            "config": str(args.config), "crf": predictor.uses_crf, "tta": predictor.tta.record(), "images": count}
    write_text_atomic(out_dir / "generate_cam.json", json.dumps(info, indent=2) + "\n")
    gating = "stage-2 segmenter, no presence gating" if segmenter else f"presence protocol '{protocol}'"
    print(f"wrote {count} masks ({gating}) to {out_dir}")


def cli() -> None:
    run_cli(main, build_parser())


if __name__ == "__main__":
    cli()
