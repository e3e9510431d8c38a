"""File-name label parsing (method.md §1)."""

from pathlib import Path

import pytest
import torch
from support import BCSS

from construct.data.labels import parse_label
from construct.errors import DataError


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png", [1, 1, 0, 1]),
        ("luad_tile[1 0 0 1].png", [1, 0, 0, 1]),
        ("a[0000]b[0010].png", [0, 0, 1, 0]),  # the last group wins
        ("[1111]", [1, 1, 1, 1]),
    ],
)
def test_parses_both_spellings(name: str, expected: list[int]) -> None:
    label = parse_label(name, BCSS.names)
    assert label.dtype == torch.float32
    assert label.tolist() == expected


def test_only_the_file_name_is_read(tmp_path: Path) -> None:
    path = tmp_path / "run[0]" / "odd[1 1 1 1] dir" / "tile+0[0110].png"
    assert parse_label(path, BCSS.names).tolist() == [0, 1, 1, 0]
    assert parse_label(str(path), BCSS.names).tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize(
    "name",
    [
        "tile.png",  # no group
        "tile[110].png",  # 3 digits
        "tile[11011].png",  # 5 digits
        "tile[1201].png",  # not binary
        "tile[11 01].png",  # mixed spacing
        "tile[1,1,0,1].png",
        "tile[].png",
        "tile[1101]x[ab].png",  # the last group is not a label
    ],
)
def test_rejects_bad_names_naming_the_file(name: str) -> None:
    with pytest.raises(DataError) as info:
        parse_label(Path("/data/train") / name, BCSS.names)
    message = str(info.value)
    assert name in message
    assert "binary digits" in message


def test_parent_folder_label_is_not_used() -> None:
    with pytest.raises(DataError):
        parse_label("/data/[1101]/tile.png", BCSS.names)
