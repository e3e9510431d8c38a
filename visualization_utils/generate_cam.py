"""Write predicted masks (palette PNGs), optionally CAMs and colour overlays, for a split or a folder of images.

    python visualization_utils/generate_cam.py --config configs/bcss.yaml \
        --checkpoint work_dirs/bcss/construct/best.pth --split train --gpu 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from anywhere

import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from construct.cli import run_cli
from construct.data.datasets import ImageFolderDataset
from construct.data.io import write_image, write_mask
from construct.inference.predictor import Prediction, to_uint8_images
from construct.inference.render import overlay
from visualization_utils.common import (
    add_inference_arguments,
    add_model_arguments,
    atomic_output,
    first,
    load,
    make_predictor,
    presence_of,
    split_dataset,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Predict a mask for every image of a split or folder with a trained ConStruct checkpoint. "
        "Masks are palette PNGs (0=TUM 1=STR 2=LYM 3=NEC 4=BACK) named like the inputs; a generate_cam.json "
        "beside them records the presence protocol, checkpoint and settings.")
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", choices=("test", "val", "train"),
                        help="dataset split under data.root. train: CAMs are gated with each tile's image-level "
                        "label, giving the pseudo-masks a second-stage segmenter trains on; val/test: gated as "
                        "inference.presence says")
    source.add_argument("--input-dir", type=Path, metavar="DIR",
                        help="folder of images of any size >= model.image_size (larger ones are tiled with stride "
                        "inference.tile_stride); gated with predicted presence")
    parser.add_argument("--out-dir", type=Path, metavar="D",
                        help="output folder (default: <checkpoint dir>/<split>_cams or <checkpoint dir>/<input-dir name>_cams)")
    parser.add_argument("--save-cam", action="store_true",
                        help="also write cam/<name>.npy: the normalised, presence-gated CAMs the mask was computed "
                        "from (float16, 4 x H x W in TUM, STR, LYM, NEC order, values 0-1)")
    parser.add_argument("--overlay", action="store_true",
                        help="also write overlay/<name>.png: the image blended with the palette colours of its mask")
    add_inference_arguments(parser)
    return parser


def save_outputs(out_dir: Path, name: str, image: np.ndarray, prediction: Prediction, save_cam: bool,
                 save_overlay: bool) -> None:
    write_mask(out_dir / f"{name}.png", prediction.mask)
    if save_cam:
        with atomic_output(out_dir / "cam" / f"{name}.npy") as tmp, open(tmp, "wb") as handle:
            np.save(handle, prediction.cams.astype(np.float16))
    if save_overlay:
        write_image(out_dir / "overlay" / f"{name}.png", overlay(image, prediction.mask))


def main(args: argparse.Namespace) -> None:
    config, model, device = load(args)
    if args.input_dir is not None:
        # Images may differ in size, so they go one at a time (each is tiled in batches).
        dataset, protocol, batch_size = ImageFolderDataset(args.input_dir), "predicted", 1
        source = args.input_dir.name
    else:
        (dataset, protocol), batch_size = split_dataset(config, args.split), config.inference.batch_size
        source = args.split
    dataset = first(dataset, args.max_images)
    out_dir = args.out_dir or args.checkpoint.parent / f"{source}_cams"
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=config.data.num_workers)
    with make_predictor(args, config, model, device) as predictor, \
            tqdm(total=len(dataset), desc=f"masks for {source}", unit="img", dynamic_ncols=True) as progress:
        for batch in loader:
            predictions = predictor.predict_batch(batch["image"], presence_of(batch), protocol, batch["name"])
            for name, image, prediction in zip(batch["name"], to_uint8_images(batch["image"]), predictions):
                save_outputs(out_dir, name, image, prediction, args.save_cam, args.overlay)
            progress.update(len(predictions))
    info = {"source": str(args.input_dir or args.split), "protocol": protocol, "checkpoint": str(args.checkpoint),
            "config": str(args.config), "crf": predictor.uses_crf, "tta": predictor.tta.record(), "images": len(dataset)}
    with atomic_output(out_dir / "generate_cam.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(dataset)} masks (presence protocol '{protocol}') to {out_dir}")


if __name__ == "__main__":
    run_cli(main, build_parser())
