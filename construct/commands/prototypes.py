"""One figure per image: the image, its ground truth, the prediction and every prototype's similarity heatmap.

    python visualization_utils/visualize_prototypes.py --config configs/bcss.yaml \
        --checkpoint work_dirs/bcss/construct/best.pth --split test --images a.png b.png
"""

from __future__ import annotations

import argparse
import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # a bare Figure renders with Agg: no display, no pyplot state
from matplotlib.patches import Patch
from torch.utils.data import Dataset

from construct.atomic import atomic_path
from construct.classes import ClassSet
from construct.cli import run_cli
from construct.commands.common import add_model_arguments, load_settings, presence_of, split_dataset
from construct.config import Config
from construct.data.datasets import ImageFolderDataset
from construct.errors import DataError
from construct.inference.predictor import Predictor, to_uint8_images
from construct.inference.render import colorize
from construct.inference.similarity import prototype_names, prototype_similarity
from construct.inference.tiling import tiled_forward, window_stride
from construct.models.build import load_trained_model
from construct.models.construct import ConStructModel


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Draw, for each named image, the image, its ground-truth mask (val/test), the predicted mask and "
        "one cosine-similarity heatmap per prototype (refined features of the first CAM level vs. the projected "
        "prototype), titled with the class and its image-level score sigmoid(logit). Saves <name>_prototypes.png.")
    add_model_arguments(parser)
    parser.add_argument("--split", choices=("test", "val", "train"), default="test",
                        help="split under data.root whose image folder --images names are looked up in (default: test); "
                        "its masks (val/test) or file-name labels (train) give the ground truth and gate the "
                        "prediction as generate_cam.py does")
    parser.add_argument("--images", nargs="+", required=True, metavar="NAME",
                        help="image file names in the split's image folder (with or without .png), or image paths")
    parser.add_argument("--out-dir", type=Path, metavar="D", help="output folder (default: <checkpoint dir>/prototypes)")
    return parser


def find_item(name: str, dataset: Dataset, image_paths: list[Path], split_protocol: str) -> tuple[dict, Path, str]:
    """(dataset item, its path, presence protocol) for a file name in the split, or else an image path.

    Split items carry their ground truth and use the split's protocol; other images use 'predicted'.
    A name found nowhere raises DataError listing every place tried.
    """
    index = {p.name: i for i, p in enumerate(image_paths)}
    candidates = [name] if name.lower().endswith(".png") else [name, f"{name}.png"]
    for candidate in candidates:
        if candidate in index:
            return dataset[index[candidate]], image_paths[index[candidate]], split_protocol
    if Path(name).is_file():
        return ImageFolderDataset(name)[0], Path(name), "predicted"
    image_dir = image_paths[0].parent
    looked = ", ".join(str(image_dir / c) for c in candidates)
    raise DataError(f"image '{name}' not found; looked for {looked} and for a file at the path '{name}'")


def similarity_maps(model: ConStructModel, config: Config, image: torch.Tensor, device: torch.device,
                    name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-prototype cosine maps at image resolution (P×H×W) and class scores sigmoid(logit) (C,).

    Computed window by window like the prediction, so images larger than a tile work too.
    """
    sims, logits = tiled_forward(partial(prototype_similarity, model), image.to(device), config.model.image_size,
                                 window_stride(config), config.inference.batch_size, name)
    return sims[0].cpu().numpy(), torch.sigmoid(logits[0]).cpu().numpy()


def draw(image: np.ndarray, gt: np.ndarray | None, prediction: np.ndarray, protocol: str, sims: np.ndarray,
         scores: np.ndarray, names: list[str], per_class: int, title: str, classes: ClassSet) -> Figure:
    panels = 2 + (gt is not None) + len(sims)
    cols = min(4, panels)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(3.4 * cols, 3.4 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    shown = [("image", image)] + ([("ground truth", colorize(gt, classes))] if gt is not None else [])
    shown.append((f"prediction ({protocol} presence)", colorize(prediction, classes)))
    for ax, (label, picture) in zip(axes, shown):
        ax.imshow(picture)
        ax.set_title(label, fontsize=9)
    for k, (ax, sim) in enumerate(zip(axes[len(shown):], sims)):
        ax.imshow(image)
        heat = ax.imshow(sim, cmap="jet", alpha=0.5)
        fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(f"{names[k]} prototype, score {scores[k // per_class]:.2f}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    legend = [Patch(facecolor=np.array(rgb) / 255.0, edgecolor="black", label=name)
              for name, rgb in zip(classes.all_names, classes.palette)]
    fig.legend(handles=legend, loc="outside lower center", ncols=len(legend), fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def main(args: argparse.Namespace) -> None:
    config, device = load_settings(args)
    dataset, split_protocol = split_dataset(config, args.split)
    image_paths = dataset.paths if args.split == "train" else dataset.image_paths
    found = [find_item(name, dataset, image_paths, split_protocol) for name in args.images]  # before the slow part
    model = load_trained_model(config, args.checkpoint, device)
    out_dir = args.out_dir or args.checkpoint.parent / "prototypes"
    per_class = model.prototypes.per_class
    classes = ClassSet.from_config(config)
    names = prototype_names(classes.names, per_class)
    with Predictor(model, config, device, tta=True, crf=config.inference.crf.enabled, workers=1) as predictor:
        for item, path, protocol in found:
            image = item["image"]
            presence = presence_of(item)
            prediction = predictor.predict_batch(image[None], None if presence is None else presence[None], protocol,
                                                 [str(path)])[0]
            sims, scores = similarity_maps(model, config, image, device, str(path))
            gt = item["mask"].numpy().astype(np.uint8) if "mask" in item else None
            fig = draw(to_uint8_images(image[None])[0], gt, prediction.mask, protocol, sims, scores, names, per_class,
                       title=path.name, classes=classes)
            target = out_dir / f"{path.stem}_prototypes.png"
            with atomic_path(target) as tmp:
                fig.savefig(tmp, format="png", dpi=100)
            print(f"wrote {target}")


def cli() -> None:
    run_cli(main, build_parser())


if __name__ == "__main__":
    cli()
