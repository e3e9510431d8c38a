"""The class set of a dataset, as every consumer reads it: names, prompts, colours, background.

Internally the tissue classes are 0..C-1 in label order and background is C, whatever value the
dataset's masks give background (``background.index``); masks are mapped on reading and writing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from construct.config import Config

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class ClassSet:
    names: tuple[str, ...]
    """Tissue classes in label order (the order of the label vector and the prototypes)."""
    prompts: tuple[str, ...]
    """One text description per class; it initialises the class's prototypes."""
    colors: tuple[RGB, ...]
    """Palette colour of each class in masks, overviews and GeoJSON."""
    background_name: str = "BACK"
    background_color: RGB = (255, 255, 255)
    background_value: int | None = None
    """Value of background in the dataset's masks; None = the number of classes (after the classes)."""

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def background(self) -> int:
        """Internal index of background: always the number of classes."""
        return len(self.names)

    @property
    def all_names(self) -> tuple[str, ...]:
        """Class names then the background's, by internal index."""
        return self.names + (self.background_name,)

    @property
    def palette(self) -> tuple[RGB, ...]:
        """Colours by internal index (background last)."""
        return self.colors + (self.background_color,)

    @property
    def mask_values(self) -> tuple[int, ...]:
        """The dataset's mask value of each internal index (classes, then background)."""
        bg = self.num_classes if self.background_value is None else self.background_value
        tissue = [v for v in range(self.num_classes + 1) if v != bg]
        return tuple(tissue) + (bg,)

    def to_internal(self, values: np.ndarray) -> np.ndarray:
        """Dataset mask values -> internal indices (identity when background comes last)."""
        if self.mask_values == tuple(range(self.num_classes + 1)):
            return values
        lut = np.full(256, 255, np.uint8)
        for internal, value in enumerate(self.mask_values):
            lut[value] = internal
        return lut[values]

    def to_dataset(self, internal: np.ndarray) -> np.ndarray:
        """Internal indices -> the dataset's mask values."""
        if self.mask_values == tuple(range(self.num_classes + 1)):
            return internal
        lut = np.arange(256, dtype=np.uint8)
        lut[: self.num_classes + 1] = self.mask_values
        return lut[internal]

    def describe(self) -> str:
        return ", ".join(self.names)

    @classmethod
    def from_config(cls, config: Config) -> ClassSet:
        """The class set ``config`` describes (``data.classes`` and ``data.background``)."""
        data = config.data
        return cls(
            names=tuple(c.name for c in data.classes),
            prompts=tuple(c.prompt for c in data.classes),
            colors=tuple(_rgb(c.color) for c in data.classes),
            background_name=data.background.name,
            background_color=_rgb(data.background.color),
            background_value=data.background.index,
        )

    @classmethod
    def from_names(cls, names: Sequence[str], colors: Sequence[Sequence[int]] | None = None,
                   background_name: str = "BACK") -> ClassSet:
        """A class set without prompts (e.g. read back from a checkpoint or a mask file's metadata)."""
        palette = colors or default_colors(len(names))
        return cls(tuple(names), tuple("" for _ in names), tuple(_rgb(c) for c in palette), background_name)


def _rgb(color: Sequence[int]) -> RGB:
    return (int(color[0]), int(color[1]), int(color[2]))


def default_colors(count: int) -> list[RGB]:
    """Distinct colours for ``count`` classes when a dataset names none (evenly spaced hues)."""
    import colorsys

    return [_rgb([round(255 * c) for c in colorsys.hsv_to_rgb(i / max(count, 1), 0.85, 0.9)]) for i in range(count)]
