"""BCSS-WSSS datasets (method.md §1): labelled train tiles, masked val/test tiles, and
plain image folders for inference.

Layout::

    <root>/train/*.png                      labels in the file names, e.g. ...+0[1101].png
    <root>/{val|valid}/img/*.png            with <root>/{val|valid}/mask/<same name>.png
    <root>/test/img/*.png                   with <root>/test/mask/<same name>.png
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from construct.constants import NUM_CLASSES
from construct.data.io import read_image, read_mask
from construct.data.labels import parse_label
from construct.data.transforms import flip_rotate
from construct.errors import DataError

LAYOUT = (
    "expected <root>/train/*.png, <root>/val/img/*.png + <root>/val/mask/*.png "
    "('valid' is accepted for 'val') and <root>/test/img/*.png + <root>/test/mask/*.png"
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid"), "valid": ("val", "valid"), "test": ("test",)}


def list_images(folder: Path, suffixes: Sequence[str] = (".png",)) -> list[Path]:
    """Return the image files directly inside ``folder``, sorted by name.

    Hidden files (e.g. macOS ``._x.png`` resource forks) are skipped.
    """
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")
    )


def resolve_split_dir(root: str | Path, split: str) -> Path:
    """Return the folder of ``split`` ('train', 'val' or 'valid', 'test') under ``root``.

    Raises DataError when the root, split, ``img`` or ``mask`` folder is missing, when both
    ``val`` and ``valid`` exist (ambiguous), or when the split holds no PNG tiles.
    """
    root = Path(root)
    if split not in _SPLIT_FOLDERS:
        raise DataError(f"unknown split {split!r}; expected one of train, val (or valid), test")
    if not root.is_dir():
        raise DataError(f"dataset root {root} not found; {LAYOUT}")
    found = [root / name for name in _SPLIT_FOLDERS[split] if (root / name).is_dir()]
    if not found:
        names = " or ".join(str(root / n) for n in _SPLIT_FOLDERS[split])
        raise DataError(f"split folder {names} not found; {LAYOUT}")
    if len(found) > 1:
        raise DataError(f"both {found[0]} and {found[1]} exist; keep only one validation folder")
    split_dir = found[0]
    image_dir = split_dir if split == "train" else split_dir / "img"
    if not image_dir.is_dir():
        raise DataError(f"{image_dir} not found; {LAYOUT}")
    if not list_images(image_dir):
        raise DataError(f"{image_dir} holds no .png tiles; {LAYOUT}")
    if split != "train" and not (split_dir / "mask").is_dir():
        raise DataError(f"{split_dir / 'mask'} not found; {LAYOUT}")
    return split_dir


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 → 3×H×W float tensor in [0, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)


class TrainDataset(Dataset):
    """Train tiles with image-level labels: items ``{"image", "label", "name"}``.

    ``image`` is 3×H×W float in [0, 1], ``label`` a float (4,) vector, ``name`` the file
    stem. All labels are parsed at construction, so a bad file name fails before training.
    """

    def __init__(self, root: str | Path, augment: bool = True) -> None:
        self.paths = list_images(resolve_split_dir(root, "train"))
        self.labels = torch.stack([parse_label(p) for p in self.paths])
        self.augment = augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        image = to_tensor(read_image(path))
        if self.augment:
            image, _ = flip_rotate(image)
        return {"image": image, "label": self.labels[index].clone(), "name": path.stem}


class EvalDataset(Dataset):
    """Val/test tiles with masks: items ``{"image", "mask", "name", "presence"}``.

    ``mask`` is an H×W LongTensor of class indices 0–4 and ``presence`` a float (4,) vector
    of the tissue classes 0–3 found in the mask (for oracle gating, method.md §7). Missing
    masks are reported at construction; a size mismatch when the tile is read.
    """

    def __init__(self, root: str | Path, split: str) -> None:
        split_dir = resolve_split_dir(root, split)
        self.image_paths = list_images(split_dir / "img")
        self.mask_paths = [split_dir / "mask" / p.name for p in self.image_paths]
        missing = [m for m in self.mask_paths if not m.is_file()]
        if missing:
            shown = ", ".join(str(m) for m in missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise DataError(f"{len(missing)} mask(s) missing in {split_dir / 'mask'}: {shown}")

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path = self.image_paths[index], self.mask_paths[index]
        image = read_image(image_path)
        mask = read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise DataError(
                f"{mask_path}: mask size {mask.shape[1]}×{mask.shape[0]} does not match image "
                f"{image_path} size {image.shape[1]}×{image.shape[0]}"
            )
        mask_t = torch.from_numpy(mask).long()
        presence = torch.bincount(mask_t.flatten(), minlength=NUM_CLASSES + 1)[:NUM_CLASSES] > 0
        return {"image": to_tensor(image), "mask": mask_t, "name": image_path.stem, "presence": presence.float()}


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
