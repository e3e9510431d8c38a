"""Tile data: file-name and CSV labels, image/mask I/O, datasets, augmentation, synthetic data."""

from construct.data.datasets import (
    IMAGE_SUFFIXES,
    EvalDataset,
    ImageFolderDataset,
    TrainDataset,
    eval_dataset,
    list_images,
    resolve_split_dir,
    to_tensor,
    train_dataset,
)
from construct.data.io import read_image, read_mask, write_image, write_mask
from construct.data.labels import parse_label, read_label_csv
from construct.data.transforms import flip_rotate


def __getattr__(name: str) -> object:
    # The synthetic generator is also a ``python -m`` entry point; importing it eagerly here
    # would make runpy warn that the module was imported before being run as __main__.
    if name in ("generate_dataset", "make_tile", "tile_rng"):
        from construct.data import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IMAGE_SUFFIXES",
    "EvalDataset",
    "ImageFolderDataset",
    "TrainDataset",
    "eval_dataset",
    "flip_rotate",
    "generate_dataset",
    "list_images",
    "make_tile",
    "parse_label",
    "read_label_csv",
    "read_image",
    "read_mask",
    "resolve_split_dir",
    "tile_rng",
    "to_tensor",
    "train_dataset",
    "write_image",
    "write_mask",
]
