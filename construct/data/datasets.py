"""Tile datasets: labelled train tiles, masked val/test tiles, and plain image folders for inference.

Layout (folder names from ``data.split_folders``)::

    <root>/train/*.png  (or <root>/train/img/*.png)   labels in the file names or in data.label_csv
    <root>/{val|valid}/img/*.png                      with <root>/{val|valid}/mask/<same stem>.png
    <root>/test/img/*.png                             with <root>/test/mask/<same stem>.png

Tiles may be PNG, JPEG, TIFF or BMP (IMAGE_SUFFIXES) and of any size. Masks must be lossless
(PNG or TIFF): JPEG compression blurs class values into one another. Train tiles of another size
than ``model.image_size`` are resized to it (see :class:`TrainDataset`); val/test images keep their
own size, so a batch is only ever formed of same-size images (:func:`collate_same_size`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from construct.classes import ClassSet
from construct.data.io import read_image, read_mask
from construct.data.labels import parse_label, read_label_csv
from construct.data.transforms import flip_rotate
from construct.errors import DataError

if TYPE_CHECKING:
    from construct.config import Config

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
"""File suffixes of tiles (any letter case)."""
MASK_SUFFIXES = (".png", ".tif", ".tiff")
"""Lossless formats a mask may have."""
LOSSY_SUFFIXES = (".jpg", ".jpeg")
DEFAULT_FOLDERS: Mapping[str, Sequence[str]] = {"train": ("train",), "val": ("val", "valid"), "test": ("test",)}


def _layout(folders: Mapping[str, Sequence[str]]) -> str:
    train, val, test = ("|".join(folders[k]) for k in ("train", "val", "test"))
    return (f"expected <root>/{train}/*.png (or <root>/{train}/img/*.png), <root>/{val}/img/*.png + "
            f"<root>/{val}/mask/*.png and <root>/{test}/img/*.png + <root>/{test}/mask/*.png "
            f"(tiles {'/'.join(IMAGE_SUFFIXES)}, masks {'/'.join(MASK_SUFFIXES)})")


def list_images(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
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
    split holds no tiles of IMAGE_SUFFIXES.
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
        raise DataError(f"{image_dir} holds no tiles; {layout}")
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

    With ``tile_size``, a tile of another size is resized (bilinear, antialiased) to
    ``tile_size``×``tile_size``, so every batch stacks and the whole tile stays in view: an
    image-level label speaks of the whole tile, and a crop could cut away the only region of a
    positive class, while padding would add tissue-free pixels the label does not describe.
    Resizing changes the tile's magnification by the size ratio (a 256 px tile at 224 is ×0.875);
    a non-square tile is stretched. Without ``tile_size`` tiles keep their own size.
    """

    def __init__(self, root: str | Path, classes: ClassSet, augment: bool = True, label_csv: str | Path | None = None,
                 folders: Mapping[str, Sequence[str]] = DEFAULT_FOLDERS, tile_size: int | None = None) -> None:
        image_dir = image_folder(resolve_split_dir(root, "train", folders), "train")
        self.paths = list_images(image_dir)
        if label_csv is None:
            self.labels = torch.stack([parse_label(p, classes.names) for p in self.paths])
        else:
            self.labels = _labels_from_csv(Path(root) / label_csv, classes, image_dir, self.paths)
        self.augment = augment
        self.tile_size = tile_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        image = to_tensor(read_image(path))
        if self.tile_size is not None and tuple(image.shape[-2:]) != (self.tile_size, self.tile_size):
            image = resize_image(image, self.tile_size)
        if self.augment:
            image, _ = flip_rotate(image)
        return {"image": image, "label": self.labels[index].clone(), "name": path.stem}


def resize_image(image: torch.Tensor, side: int) -> torch.Tensor:
    """3×H×W [0, 1] image → 3×side×side (bilinear; antialiased when shrinking)."""
    resized = F.interpolate(image[None], size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return resized[0].clamp_(0.0, 1.0)


def _labels_from_csv(csv_path: Path, classes: ClassSet, image_dir: Path, paths: Sequence[Path]) -> torch.Tensor:
    """The CSV's label of every train tile; a row without a tile, or a tile without a row, is an error."""
    by_name = read_label_csv(csv_path, classes.names)
    present = {p.name for p in paths}
    for name in by_name:
        if name not in present:
            reason = missing_tile_reason(name, image_dir, {p.stem: p.name for p in paths})
            raise DataError(f"{csv_path}: row for {name}: {reason}")
    unlabelled = [p.name for p in paths if p.name not in by_name]
    if unlabelled:
        raise DataError(f"{image_dir / unlabelled[0]}: no row in {csv_path}"
                        + (f" (and {len(unlabelled) - 1} more tiles)" if len(unlabelled) > 1 else ""))
    return torch.stack([by_name[p.name] for p in paths])


def missing_tile_reason(name: str, image_dir: Path, names_by_stem: Mapping[str, str]) -> str:
    """Why a CSV row's file name matches no tile: absent, or present under another suffix or format.

    ``names_by_stem``: the split's tile file names by stem (built once per split)."""
    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        return f"not a tile name (tiles end in {', '.join(IMAGE_SUFFIXES)})"
    other = names_by_stem.get(Path(name).stem)
    if other is not None:
        return f"no such tile in {image_dir}, but {other} is there (the row must name the file exactly)"
    return f"no such tile in {image_dir}"


def pair_masks(image_paths: Sequence[Path], mask_dir: Path) -> tuple[list[Path | None], list[str]]:
    """The mask of each image (``mask_dir/<image stem>.png|.tif|.tiff``) and one line per problem.

    A problem names the file: a missing mask, a JPEG mask (lossy: compression mixes neighbouring
    class values), two masks or two images of one stem. The image of a problem gets None.
    """
    by_stem: dict[str, list[Path]] = {}
    if mask_dir.is_dir():
        for path in mask_dir.iterdir():
            if path.is_file() and not path.name.startswith("."):
                by_stem.setdefault(path.stem, []).append(path)
    problems: list[str] = []
    stems: dict[str, Path] = {}
    masks: list[Path | None] = []
    for image in image_paths:
        mask = None
        candidates = sorted(by_stem.get(image.stem, []))
        lossless = [m for m in candidates if m.suffix.lower() in MASK_SUFFIXES]
        lossy = [m for m in candidates if m.suffix.lower() in LOSSY_SUFFIXES]
        if image.stem in stems:
            problems.append(f"{image}: shares the name {image.stem!r} with {stems[image.stem]}; "
                            "which of them a mask belongs to is ambiguous")
        elif len(lossless) > 1:
            problems.append(f"{lossless[0]} and {lossless[1]}: two masks for {image}; keep one")
        elif lossless:
            mask = lossless[0]
        elif lossy:
            problems.append(f"{lossy[0]}: JPEG mask refused: lossy compression changes class values at region "
                            f"borders; save masks as PNG or TIFF ({'/'.join(MASK_SUFFIXES)})")
        else:
            problems.append(f"{mask_dir / (image.stem + '.png')}: mask missing for {image}")
        stems.setdefault(image.stem, image)
        masks.append(mask)
    return masks, problems


def collate_same_size(items: Sequence[dict]) -> list[dict]:
    """DataLoader ``collate_fn`` for images of mixed sizes: one batch per image size, in order of
    first appearance (one batch when all sizes agree)."""
    groups: dict[tuple[int, ...], list[dict]] = {}
    for item in items:
        groups.setdefault(tuple(item["image"].shape), []).append(item)
    return [default_collate(group) for group in groups.values()]


def same_size_batches(loader: Iterable[dict | list[dict]]) -> Iterator[dict]:
    """The batches of a loader, one per image size: it may collate with :func:`collate_same_size`
    (lists of batches) or stack plain batches of one size."""
    for batch in loader:
        yield from (batch if isinstance(batch, list) else [batch])


class EvalDataset(Dataset):
    """Val/test tiles with masks: items ``{"image", "mask", "name", "presence"}``.

    ``mask`` is an H×W LongTensor of internal indices (classes 0..C-1, background C) and
    ``presence`` a float (C,) vector of the tissue classes found in the mask (for oracle gating,
    method.md §7). Images keep their own size (batch them with :func:`collate_same_size`). Missing,
    JPEG or ambiguous masks are reported at construction; a size mismatch when the tile is read.
    """

    def __init__(self, root: str | Path, split: str, classes: ClassSet,
                 folders: Mapping[str, Sequence[str]] = DEFAULT_FOLDERS) -> None:
        image_dir = image_folder(resolve_split_dir(root, split, folders), split)
        self.classes = classes
        self.image_paths = list_images(image_dir)
        masks, problems = pair_masks(self.image_paths, image_dir.parent / "mask")
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise DataError(problems[0] + more)
        self.mask_paths = [m for m in masks if m is not None]

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


def train_dataset(config: Config, augment: bool = False, resize: bool = True) -> TrainDataset:
    """The train split of ``config``'s dataset (its classes, label source and folder names); with
    ``resize`` every tile comes at ``model.image_size`` (training), else at its own size (export)."""
    return TrainDataset(config.data.root, ClassSet.from_config(config), augment=augment,
                        label_csv=config.data.label_csv, folders=split_folders(config),
                        tile_size=config.model.image_size if resize else None)


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
