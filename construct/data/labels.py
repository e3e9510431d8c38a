"""Image-level train labels: bracketed bits in the file names (BCSS-WSSS, LUAD-HistoSeg) or a CSV.

A label is a float 0/1 vector over the dataset's classes in label order. Every train tile needs at
least one positive class: a tile with none gives the classification loss nothing to learn and
its CAMs nothing to show.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from construct.errors import DataError

_GROUP = re.compile(r"\[([^\[\]]*)\]")
_SEPARATORS = re.compile(r"[\s,;|]+")


def _bits_pattern(count: int) -> re.Pattern[str]:
    # BCSS-WSSS writes "[1101]", LUAD-HistoSeg "[1 1 0 1]"; nothing else is a label.
    return re.compile(r"[01]{%d}|[01]( [01]){%d}" % (count, count - 1))


def parse_label(path: str | Path, class_names: Sequence[str]) -> torch.Tensor:
    """The float label vector held in the file name of ``path``, one bit per class of ``class_names``.

    Only the file name is read (a ``[`` in a parent folder does not matter); the label is its
    last ``[...]`` group. Raises DataError naming the file when the group is missing, does not
    hold exactly one binary digit per class, or names no class.
    """
    path = Path(path)
    count = len(class_names)
    expected = (
        f"the file name must end its label as [{'b' * count}] or [{' '.join('b' * count)}] with {count} binary "
        f"digits in the order {' '.join(class_names)}, e.g. 'tile+0[{'1' + '0' * (count - 1)}].png'"
    )
    groups = _GROUP.findall(path.name)
    if not groups:
        raise DataError(f"{path}: no [...] label group in the file name; {expected}")
    bits = groups[-1]
    if not _bits_pattern(count).fullmatch(bits):
        raise DataError(f"{path}: invalid label [{bits}]; {expected}")
    label = torch.tensor([float(b) for b in bits.replace(" ", "")])
    _require_positive(label, str(path))
    return label


def _require_positive(label: torch.Tensor, where: str) -> None:
    if not label.any():
        raise DataError(f"{where}: the label has no positive class; every train tile needs at least one")


DELIMITERS = (",", ";", "\t")
"""Cell separators of a label CSV: comma, semicolon (spreadsheets in locales with a decimal comma), tab."""
_DELIMITER_NAMES = {",": "commas", ";": "semicolons", "\t": "tabs"}


def sniff_delimiter(header: str) -> str:
    """The separator of a CSV whose first line is ``header``: the one of DELIMITERS it holds most of
    (comma when it holds none, as for a one-column file)."""
    counts = {delimiter: header.count(delimiter) for delimiter in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def read_label_csv(path: str | Path, class_names: Sequence[str],
                   problems: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Labels by file name from a CSV: ``filename`` plus one 0/1 column per class, or ``filename,labels``.

    Cells are separated by commas, semicolons or tabs (read from the header line). A ``labels`` cell
    holds class names (``TUM STR``, ``TUM;STR``) or one bit per class (``1 1 0 0``). Every problem is
    one DataError naming the file and the row (1-based, header = row 1); with ``problems``, a bad row
    is appended there instead and left out, so that all of them can be listed together.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label CSV not found (data.label_csv)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            delimiter = sniff_delimiter(handle.readline())
            handle.seek(0)
            rows = list(csv.reader(handle, delimiter=delimiter))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the label CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path}: the label CSV is empty; expected a header 'filename,{','.join(class_names)}' "
                        "or 'filename,labels'")
    header = [cell.strip() for cell in rows[0]]
    if "filename" not in header:
        raise DataError(f"{path}: row 1: no 'filename' column in the header {header} (cells separated by "
                        f"{_DELIMITER_NAMES[delimiter]})")
    name_col = header.index("filename")
    if "labels" in header:
        labels_col = header.index("labels")
        parse = lambda cells, row: _names_cell(cells[labels_col], class_names, path, row)  # noqa: E731
    else:
        missing = [name for name in class_names if name not in header]
        extra = [h for h in header if h not in class_names and h != "filename"]
        if missing or extra:
            problem = (f"no column for class{'es' if len(missing) > 1 else ''} {', '.join(missing)}" if missing
                       else f"unknown class column{'s' if len(extra) > 1 else ''} {', '.join(extra)}")
            raise DataError(f"{path}: row 1: {problem}; the header must be filename plus the classes "
                            f"{', '.join(class_names)} (or filename,labels)")
        columns = [header.index(name) for name in class_names]
        parse = lambda cells, row: _bit_columns(cells, columns, class_names, path, row)  # noqa: E731
    labels: dict[str, torch.Tensor] = {}
    for row, cells in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue
        try:
            if len(cells) != len(header):
                raise DataError(f"{path}: row {row}: {len(cells)} cells, the header has {len(header)}")
            name = cells[name_col].strip()
            if not name:
                raise DataError(f"{path}: row {row}: empty filename")
            if name in labels:
                raise DataError(f"{path}: row {row}: {name} is listed twice")
            label = parse(cells, row)
            _require_positive(label, f"{path}: row {row} ({name})")
        except DataError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
            continue
        labels[name] = label
    if not labels and problems:
        return labels
    if not labels:
        raise DataError(f"{path}: the label CSV has a header but no rows")
    return labels


def _bit_columns(cells: list[str], columns: list[int], class_names: Sequence[str], path: Path, row: int) -> torch.Tensor:
    values = []
    for column, name in zip(columns, class_names):
        cell = cells[column].strip()
        if cell not in ("0", "1"):
            raise DataError(f"{path}: row {row}: column {name} must be 0 or 1, got {cell!r}")
        values.append(float(cell))
    return torch.tensor(values)


def _names_cell(cell: str, class_names: Sequence[str], path: Path, row: int) -> torch.Tensor:
    tokens = [t for t in _SEPARATORS.split(cell.strip().strip("[]")) if t]
    if tokens and all(t in ("0", "1") for t in tokens) and not set(tokens) & set(class_names):
        if len(tokens) != len(class_names):
            raise DataError(f"{path}: row {row}: label vector of {len(tokens)} bits, expected {len(class_names)} "
                            f"({' '.join(class_names)})")
        return torch.tensor([float(t) for t in tokens])
    unknown = [t for t in tokens if t not in class_names]
    if unknown:
        raise DataError(f"{path}: row {row}: unknown class {unknown[0]!r} (classes: {', '.join(class_names)})")
    return torch.tensor([float(name in tokens) for name in class_names])
