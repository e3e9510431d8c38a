"""The README stays a short front page whose commands work: every `python ...` command and
console script it shows answers --help, and the Python API example runs on a trained checkpoint."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tomllib
from support import ENTRY_POINTS, HE_FIXTURE, REPO

import construct
from construct.data.io import read_image
from construct.errors import ConStructError
from construct_lab.synthetic.slide import write_synthetic_slide

README = (REPO / "README.md").read_text(encoding="utf-8")
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]


def shown_commands() -> list[list[str]]:
    """The programs the README's shell blocks run: ``python FILE`` / ``python -m MODULE`` and console scripts."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    commands = set()
    for line in "\n".join(blocks).splitlines():
        for match in re.finditer(r"\bpython3? (-m [\w.]+|[\w/]+\.py)", line):
            commands.add(tuple(match.group(1).split()))
        for name in re.findall(r"\b(construct-[a-z-]+)\b", line):
            commands.add(("console", name))
    return sorted(list(c) for c in commands)


def test_the_readme_is_a_front_page() -> None:
    assert len(README.splitlines()) <= 200
    assert ["main.py"] in shown_commands()
    assert ["visualization_utils/predict_slide.py"] in shown_commands()


def test_each_readme_command_is_one_whose_help_is_tested() -> None:
    """Every program the README runs is an entry point whose --help test_layout runs, or a console
    script whose --help test_install runs (so each is run once, not twice)."""
    entry_points = {tuple(command) for command in ENTRY_POINTS} | {("-m", "venv")}  # venv: the install step
    for command in shown_commands():
        if command[0] == "console":
            assert command[1] in SCRIPTS, command
        else:
            assert tuple(command) in entry_points, command


def test_the_api_example_segments_a_tile_and_a_slide(tiny_run, tmp_path) -> None:
    slide = tmp_path / "slide.tif"
    write_synthetic_slide(slide, 500, 400, mpp=1.0, seed=0)
    with construct.load_segmenter(tiny_run / "best.pth", device="cpu", tta=False, crf=False,
                                  opts=["data.mpp=2.0"]) as segmenter:
        tile = segmenter.predict_tile(HE_FIXTURE)
        same = segmenter.predict_tile(read_image(HE_FIXTURE))
        report = segmenter.predict_slide(slide, tmp_path / "out")
    assert tile.mask.shape == (768, 768) and tile.mask.dtype == np.uint8
    assert set(np.unique(tile.mask)) <= set(tile.mask_values)
    assert tile.class_names == ("TUM", "STR", "LYM", "NEC", "BACK")
    np.testing.assert_array_equal(tile.mask, same.mask)
    assert (tmp_path / "out" / "slide_mask.tif").is_file() and (tmp_path / "out" / "slide_regions.geojson").is_file()
    assert report["tissue_mm2"] > 0 and set(report["areas_mm2"]) == set(tile.class_names)


def test_the_api_names_a_missing_config(tmp_path) -> None:
    with pytest.raises(ConStructError, match="no config.yaml beside it"):
        construct.load_segmenter(tmp_path / "best.pth")
