"""Tile datasets: labelled train tiles, masked val/test tiles, and plain image folders for inference.

Layout (folder names from ``data.split_folders``)::

    <root>/train/*.png  (or <root>/train/img/*.png)   labels in the file names or in data.label_csv
    <root>/{val|valid}/img/*.png                      with <root>/{val|valid}/mask/<same name>.png
    <root>/test/img/*.png                             with <root>/test/mask/<same name>.png
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from construct.classes import ClassSet
from construct.data.io import read_image, read_mask
from construct.data.labels import parse_label, read_label_csv
from construct.data.transforms import flip_rotate
from construct.errors import DataError

if TYPE_CHECKING:
    from construct.config import Config

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DEFAULT_FOLDERS: Mapping[str, Sequence[str]] = {"train": ("train",), "val": ("val", "valid"), "test": ("test",)}


def _layout(folders: Mapping[str, Sequence[str]]) -> str:
    train, val, test = ("|".join(folders[k]) for k in ("train", "val", "test"))
    return (f"expected <root>/{train}/*.png (or <root>/{train}/img/*.png), <root>/{val}/img/*.png + "
            f"<root>/{val}/mask/*.png and <root>/{test}/img/*.png + <root>/{test}/mask/*.png")


def list_images(folder: Path, suffixes: Sequence[str] = (".png",)) -> list[Path]:
    """Return the image files directly inside ``folder``, sorted by name.

    Hidden files (e.g. macOS ``._x.png`` resource forks) are skipped.
    """
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")
    )


def resolve_split_dir(root: str | Path, split: str, folders: Mapping[str, Sequence[str]] = DEFAULT_FOLDERS) -> Path:
    """Return the folder of ``split`` ('train', 'val' or 'valid', 'test') under ``root``.

    Its images are in :func:`image_folder`. Raises DataError when the root, split, ``img`` or ``mask``
    folder is missing, when two accepted names of one split both exist (ambiguous), or when the
    split holds no PNG tiles.
    """
    root = Path(root)
    split = "val" if split == "valid" else split
    if split not in ("train", "val", "test"):
        raise DataError(f"unknown split {split!r}; expected one of train, val (or valid), test")
    layout = _layout(folders)
    if not root.is_dir():
        raise DataError(f"dataset root {root} not found; {layout}")
    found = [root / name for name in folders[split] if (root / name).is_dir()]
    if not found:
        names = " or ".join(str(root / n) for n in folders[split])
        raise DataError(f"split folder {names} not found; {layout}")
    if len(found) > 1:
        raise DataError(f"both {found[0]} and {found[1]} exist; keep only one {split} folder")
    split_dir = found[0]
    image_dir = image_folder(split_dir, split)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir} not found; {layout}")
    if not list_images(image_dir):
        raise DataError(f"{image_dir} holds no .png tiles; {layout}")
    if split != "train" and not (split_dir / "mask").is_dir():
        raise DataError(f"{split_dir / 'mask'} not found; {layout}")
    return split_dir


def image_folder(split_dir: Path, split: str) -> Path:
    """Val/test images are in ``<split>/img`` (beside ``<split>/mask``); train tiles in ``train/img``
    when that folder exists (TPRO's LUAD layout), else directly in ``train/``."""
    if split == "train" and not (split_dir / "img").is_dir():
        return split_dir
    return split_dir / "img"


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 → 3×H×W float tensor in [0, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)


class TrainDataset(Dataset):
    """Train tiles with image-level labels: items ``{"image", "label", "name"}``.

    ``image`` is 3×H×W float in [0, 1], ``label`` a float (C,) vector over ``classes``, ``name``
    the file stem. Labels come from the file names, or from ``label_csv`` when given; all are read
    at construction, so a bad name or row fails before training.
    """

    def __init__(self, root: str | Path, classes: ClassSet, augment: bool = True, label_csv: str | Path | None = None,
                 folders: Mapping[str, Sequence[str]] = DEFAULT_FOLDERS) -> None:
        image_dir = image_folder(resolve_split_dir(root, "train", folders), "train")
        self.paths = list_images(image_dir)
        if label_csv is None:
            self.labels = torch.stack([parse_label(p, classes.names) for p in self.paths])
        else:
            self.labels = _labels_from_csv(Path(root) / label_csv, classes, image_dir, self.paths)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        image = to_tensor(read_image(path))
        if self.augment:
            image, _ = flip_rotate(image)
        return {"image": image, "label": self.labels[index].clone(), "name": path.stem}


def _labels_from_csv(csv_path: Path, classes: ClassSet, image_dir: Path, paths: Sequence[Path]) -> torch.Tensor:
    """The CSV's label of every train tile; a row without a tile, or a tile without a row, is an error."""
    by_name = read_label_csv(csv_path, classes.names)
    present = {p.name for p in paths}
    for name in by_name:
        if name not in present:
            raise DataError(f"{csv_path}: row for {name}: no such tile in {image_dir}")
    unlabelled = [p.name for p in paths if p.name not in by_name]
    if unlabelled:
        raise DataError(f"{image_dir / unlabelled[0]}: no row in {csv_path}"
                        + (f" (and {len(unlabelled) - 1} more tiles)" if len(unlabelled) > 1 else ""))
    return torch.stack([by_name[p.name] for p in paths])


class EvalDataset(Dataset):
    """Val/test tiles with masks: items ``{"image", "mask", "name", "presence"}``.

    ``mask`` is an H×W LongTensor of internal indices (classes 0..C-1, background C) and
    ``presence`` a float (C,) vector of the tissue classes found in the mask (for oracle gating,
    method.md §7). Missing masks are reported at construction; a size mismatch when the tile is read.
    """

    def __init__(self, root: str | Path, split: str, classes: ClassSet,
                 folders: Mapping[str, Sequence[str]] = DEFAULT_FOLDERS) -> None:
        image_dir = image_folder(resolve_split_dir(root, split, folders), split)
        self.classes = classes
        self.image_paths = list_images(image_dir)
        self.mask_paths = [image_dir.parent / "mask" / p.name for p in self.image_paths]
        missing = [m for m in self.mask_paths if not m.is_file()]
        if missing:
            shown = ", ".join(str(m) for m in missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise DataError(f"{len(missing)} mask(s) missing in {image_dir.parent / 'mask'}: {shown}")

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path = self.image_paths[index], self.mask_paths[index]
        image = read_image(image_path)
        mask = read_mask(mask_path, self.classes)
        if image.shape[:2] != mask.shape:
            raise DataError(
                f"{mask_path}: mask size {mask.shape[1]}×{mask.shape[0]} does not match image "
                f"{image_path} size {image.shape[1]}×{image.shape[0]}"
            )
        mask_t = torch.from_numpy(mask).long()
        count = self.classes.num_classes
        presence = torch.bincount(mask_t.flatten(), minlength=count + 1)[:count] > 0
        return {"image": to_tensor(image), "mask": mask_t, "name": image_path.stem, "presence": presence.float()}


def split_folders(config: Config) -> dict[str, Sequence[str]]:
    folders = config.data.split_folders
    return {"train": folders.train, "val": folders.val, "test": folders.test}


def train_dataset(config: Config, augment: bool = False) -> TrainDataset:
    """The train split of ``config``'s dataset (its classes, label source and folder names)."""
    return TrainDataset(config.data.root, ClassSet.from_config(config), augment=augment,
                        label_csv=config.data.label_csv, folders=split_folders(config))


def eval_dataset(config: Config, split: str) -> EvalDataset:
    """A val/test split of ``config``'s dataset."""
    return EvalDataset(config.data.root, split, ClassSet.from_config(config), folders=split_folders(config))


class ImageFolderDataset(Dataset):
    """Unlabelled images for inference: items ``{"image", "name"}``.

    ``paths`` is a folder (its images with suffixes in IMAGE_SUFFIXES are taken, sorted), an
    image file, or a sequence of either. Names are file stems and must be unique, since
    outputs are written as ``<name>.png``.
    """

    def __init__(self, paths: str | Path | Sequence[str | Path]) -> None:
        items = [paths] if isinstance(paths, (str, Path)) else list(paths)
        self.paths: list[Path] = []
        for item in map(Path, items):
            if item.is_dir():
                self.paths.extend(list_images(item, IMAGE_SUFFIXES))
            elif item.is_file():
                self.paths.append(item)
            else:
                raise DataError(f"{item}: no such file or folder")
        if not self.paths:
            where = ", ".join(map(str, items)) or "an empty list of paths"
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {where}")
        seen: dict[str, Path] = {}
        for p in self.paths:
            if p.stem in seen:
                raise DataError(f"{seen[p.stem]} and {p} share the name {p.stem!r}; outputs would collide")
            seen[p.stem] = p

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        return {"image": to_tensor(read_image(path)), "name": path.stem}
