"""The data check: every file of a dataset read once, before a model is built.

It reads every train label (file names or the label CSV), every tile's header (size, mode, bit
depth; the pixels are not decoded) and every val/test mask in full (mode, size, class values).
Each problem is one line naming the file; all of them are gathered, so a user fixes a dataset in
one pass instead of one error per run. The summary it prints (tiles per split, tile sizes,
positives per class, labels per tile, pixel shares per class) shows at a glance a class with a
handful of positives or one missing from the masks.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from construct.classes import ClassSet
from construct.data.datasets import (
    DEFAULT_FOLDERS,
    image_folder,
    list_images,
    missing_tile_reason,
    pair_masks,
    resolve_split_dir,
    split_folders,
)
from construct.data.io import image_header, read_mask
from construct.data.labels import parse_label, read_label_csv
from construct.errors import DataError

if TYPE_CHECKING:
    from construct.config import Config

FEW_POSITIVES = 10
"""A class with fewer positive train tiles than this is named in the summary's notes."""
SHOWN_PROBLEMS = 50
"""How many problem lines are printed before the rest are only counted."""


@dataclass
class SplitSummary:
    """What the check found in one split."""

    folder: Path
    tiles: int = 0
    sizes: Counter = field(default_factory=Counter)
    """(width, height) → number of tiles."""
    positives: np.ndarray | None = None
    """Train only: positive tiles per class."""
    labels_per_tile: Counter | None = None
    """Train only: number of positive classes → number of tiles."""
    class_pixels: np.ndarray | None = None
    """Val/test only: mask pixels per internal class (the classes, then background)."""


@dataclass
class DataReport:
    root: Path
    classes: ClassSet
    tile_size: int
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """The dataset in a few lines: tiles and sizes per split, train labels, mask pixel shares, notes."""
        names = self.classes.names
        lines = [f"data check of {self.root}: {sum(s.tiles for s in self.splits.values()):,} tiles in "
                 f"{self.seconds:.1f} s, {len(self.problems)} problem{'' if len(self.problems) == 1 else 's'}"]
        for split, found in self.splits.items():
            sizes = ", ".join(f"{w}×{h} ×{n:,}" for (w, h), n in found.sizes.most_common(4))
            if len(found.sizes) > 4:
                sizes += f", {len(found.sizes) - 4} more sizes"
            lines.append(f"  {split:<5} {found.tiles:>7,} tiles  ({sizes or 'none readable'})  {found.folder}")
        notes = []
        train = self.splits.get("train")
        if train is not None and train.positives is not None:
            lines.append("  train positives per class: "
                         + ", ".join(f"{n} {int(c):,}" for n, c in zip(names, train.positives)))
            histogram = sorted(train.labels_per_tile.items())
            lines.append("  train labels per tile: " + ", ".join(f"{k} label{'' if k == 1 else 's'}: {v:,}"
                                                                for k, v in histogram))
            notes += [f"class {n} has only {int(c)} positive train tile{'' if c == 1 else 's'}"
                      for n, c in zip(names, train.positives) if c < FEW_POSITIVES]
            resized = sum(n for size, n in train.sizes.items() if size != (self.tile_size, self.tile_size))
            if resized:
                notes.append(f"{resized:,} train tiles are not {self.tile_size}×{self.tile_size} (model.image_size); "
                             "training resizes them to it")
        for split, found in self.splits.items():
            if found.class_pixels is None:
                continue
            total = max(int(found.class_pixels.sum()), 1)
            shares = ", ".join(f"{n} {100 * c / total:.1f}%" for n, c in zip(self.classes.all_names, found.class_pixels))
            lines.append(f"  {split} mask pixels: {shares}")
            notes += [f"class {n} is in no {split} mask" for n, c in zip(names, found.class_pixels) if c == 0]
        lines += [f"  note: {note}" for note in notes]
        return "\n".join(lines)

    def raise_if_problems(self, write: Callable[[str], None] | None = None, shown: int = SHOWN_PROBLEMS) -> None:
        """DataError when the check found problems, after writing each (up to ``shown``) as one line.

        The error's own line names the count and the first problem; ``write`` defaults to stderr.
        """
        if not self.problems:
            return
        if len(self.problems) == 1:
            raise DataError(self.problems[0])
        write = write or (lambda line: print(line, file=sys.stderr))
        write(f"data check: {len(self.problems)} problems in {self.root}:")
        for problem in self.problems[:shown]:
            write(f"  {problem}")
        if len(self.problems) > shown:
            write(f"  ... and {len(self.problems) - shown} more")
        raise DataError(f"{len(self.problems)} problems in the dataset {self.root} (listed above); the first: "
                        f"{self.problems[0]}")


def check_dataset(root: str | Path, classes: ClassSet, tile_size: int, splits: Sequence[str] = ("train", "val", "test"),
                  label_csv: str | Path | None = None, folders: Mapping[str, Sequence[str]] = DEFAULT_FOLDERS,
                  optional: Iterable[str] = (), progress: bool = True) -> DataReport:
    """Read every label, tile header and mask of ``splits`` once; return the summary and all problems.

    A split in ``optional`` whose folder is absent is left out; any other layout error (missing
    root, split or mask folder, no tiles) raises DataError at once, as there is nothing to read.
    """
    started = time.perf_counter()
    root = Path(root)
    report = DataReport(root=root, classes=classes, tile_size=tile_size)
    optional = set(optional)
    work: list[tuple[str, Path]] = []
    for split in splits:
        if split in optional and not any((root / name).is_dir() for name in folders[split]):
            continue
        folder = image_folder(resolve_split_dir(root, split, folders), split)
        work.append((split, folder))
    listed = {split: list_images(folder) for split, folder in work}
    with tqdm(total=sum(len(p) for p in listed.values()), desc="data check", unit="tile", dynamic_ncols=True,
              disable=not progress, leave=False) as bar:
        for split, folder in work:
            paths = listed[split]
            if split == "train":
                report.splits[split] = _check_train(root, folder, paths, classes, label_csv, report.problems, bar)
            else:
                report.splits[split] = _check_eval(folder, paths, classes, report.problems, bar)
    report.seconds = time.perf_counter() - started
    return report


def check_config_data(config: Config, splits: Sequence[str] = ("train", "val", "test"),
                      optional: Iterable[str] = ("test",), progress: bool = True) -> DataReport:
    """:func:`check_dataset` of ``config``'s dataset (its root, classes, label source, folders and tile size)."""
    splits = list(dict.fromkeys("val" if split == "valid" else split for split in splits))
    return check_dataset(config.data.root, ClassSet.from_config(config), config.model.image_size, splits,
                         label_csv=config.data.label_csv, folders=split_folders(config),
                         optional=optional, progress=progress)


def _read_header(path: Path, found: SplitSummary, problems: list[str]) -> tuple[int, int] | None:
    try:
        width, height, _ = image_header(path)
    except DataError as exc:
        problems.append(str(exc))
        return None
    found.sizes[(width, height)] += 1
    return width, height


def _check_train(root: Path, folder: Path, paths: list[Path], classes: ClassSet, label_csv: str | Path | None,
                 problems: list[str], bar: tqdm) -> SplitSummary:
    found = SplitSummary(folder=folder, tiles=len(paths), labels_per_tile=Counter(),
                         positives=np.zeros(classes.num_classes, np.int64))
    by_name = None
    if label_csv is not None:
        csv_path = root / label_csv
        by_name = read_label_csv(csv_path, classes.names, problems)
        present = {p.name for p in paths}
        by_stem = {p.stem: p.name for p in paths}
        problems += [f"{csv_path}: row for {name}: {missing_tile_reason(name, folder, by_stem)}"
                     for name in by_name if name not in present]
    for path in paths:
        label = None
        if by_name is None:
            try:
                label = parse_label(path, classes.names)
            except DataError as exc:
                problems.append(str(exc))
        elif path.name in by_name:
            label = by_name[path.name]
        else:
            problems.append(f"{path}: no row in {root / label_csv}")
        if label is not None:
            bits = label.numpy().astype(np.int64)
            found.positives += bits
            found.labels_per_tile[int(bits.sum())] += 1
        _read_header(path, found, problems)
        bar.update()
    return found


def _check_eval(folder: Path, paths: list[Path], classes: ClassSet, problems: list[str], bar: tqdm) -> SplitSummary:
    found = SplitSummary(folder=folder, tiles=len(paths), class_pixels=np.zeros(classes.num_classes + 1, np.int64))
    masks, pairing = pair_masks(paths, folder.parent / "mask")
    problems += pairing
    for image_path, mask_path in zip(paths, masks):
        size = _read_header(image_path, found, problems)
        if mask_path is not None:
            try:
                mask = read_mask(mask_path, classes)
            except DataError as exc:
                problems.append(str(exc))
            else:
                if size is not None and size != (mask.shape[1], mask.shape[0]):
                    problems.append(f"{mask_path}: mask size {mask.shape[1]}×{mask.shape[0]} does not match image "
                                    f"{image_path} size {size[0]}×{size[1]}")
                else:
                    found.class_pixels += np.bincount(mask.ravel(), minlength=classes.num_classes + 1)[
                        : classes.num_classes + 1]
        bar.update()
    return found
