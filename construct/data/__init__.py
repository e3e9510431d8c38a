"""Tile data: file-name and CSV labels, image/mask I/O, datasets, augmentation."""

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

__all__ = [
    "IMAGE_SUFFIXES",
    "EvalDataset",
    "ImageFolderDataset",
    "TrainDataset",
    "eval_dataset",
    "flip_rotate",
    "list_images",
    "parse_label",
    "read_label_csv",
    "read_image",
    "read_mask",
    "resolve_split_dir",
    "to_tensor",
    "train_dataset",
    "write_image",
    "write_mask",
]
