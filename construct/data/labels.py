"""Image-level labels encoded in BCSS-WSSS train file names (method.md §1)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from construct.constants import CLASS_NAMES, NUM_CLASSES
from construct.errors import DataError

_GROUP = re.compile(r"\[([^\[\]]*)\]")
# BCSS-WSSS writes "[1101]", LUAD-HistoSeg "[1 1 0 1]"; nothing else is a label.
_BITS = re.compile(r"[01]{%d}|[01]( [01]){%d}" % (NUM_CLASSES, NUM_CLASSES - 1))


def parse_label(path: str | Path) -> torch.Tensor:
    """Return the float label vector (TUM, STR, LYM, NEC) held in the file name of ``path``.

    Only the file name is read (a ``[`` in a parent folder does not matter); the label is
    its last ``[...]`` group. Raises DataError naming the file when the group is missing or
    does not hold exactly four binary digits.
    """
    path = Path(path)
    expected = (
        f"the file name must end its label as [bbbb] or [b b b b] with {NUM_CLASSES} binary "
        f"digits in the order {' '.join(CLASS_NAMES)}, e.g. 'tile+0[1101].png'"
    )
    groups = _GROUP.findall(path.name)
    if not groups:
        raise DataError(f"{path}: no [...] label group in the file name; {expected}")
    bits = groups[-1]
    if not _BITS.fullmatch(bits):
        raise DataError(f"{path}: invalid label [{bits}]; {expected}")
    return torch.tensor([float(b) for b in bits.replace(" ", "")])
