"""Bad inputs at the user-facing level (issue 7.1): every row ends in one clear line naming what is wrong.

Each CLI row runs a fresh interpreter (``main.py`` or a ``visualization_utils`` script, tiny presets,
64 px synthetic tiles) and checks: exit status 2, exactly one stderr line starting with ``error:``
that names the file, key or value, and no traceback (``--debug`` brings it back).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import BCSS, DEMO_RANDOM, REPO

from construct.checkpoint import FORMAT
from construct.config import load_config
from construct.data.datasets import EvalDataset, TrainDataset
from construct.data.io import write_mask
from construct.engine.distributed import DistInfo
from construct.engine.trainer import train
from construct.errors import CheckpointError
from construct.models.conch import load_conch
from construct_lab.synthetic.slide import write_synthetic_slide
from construct_lab.synthetic.tiles import generate_dataset

SIZE = 64


class ArbitraryObject:
    """Something a checkpoint must never smuggle in: unpickling it could run any code."""


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_inputs") / "data"
    generate_dataset(root, n_train=4, n_val=2, n_test=2, seed=0, classes=BCSS, size=SIZE)
    return root


@pytest.fixture(scope="module")
def trained_run(clean_data, tmp_path_factory) -> Path:
    """A 2-iteration run on the clean tiles: config.yaml + latest.pth for the inference scripts."""
    run = tmp_path_factory.mktemp("bad_inputs_run") / "run"
    config = load_config(DEMO_RANDOM, [f"data.root={clean_data}", "testbed.dataset=null", "data.num_workers=0",
                                f"work_dir={run}", f"model.image_size={SIZE}", "train.batch_size=2",
                                "train.max_iters=2", "inference.batch_size=2"])
    train(config, DistInfo(device=torch.device("cpu")))
    return run


@pytest.fixture(scope="module")
def conch_missing_key(tmp_path_factory) -> Path:
    """A tiny-preset CONCH state dict without ``visual.ln_contrast.bias`` (fp16 to keep the file small)."""
    state = load_conch(None, image_size=SIZE, preset="tiny").state_dict()
    del state["visual.ln_contrast.bias"]
    path = tmp_path_factory.mktemp("conch") / "conch_missing_key.bin"
    torch.save({k: v.half() for k, v in state.items()}, path)
    return path


def copy_data(clean: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    return root


def main_args(data_root: Path, work_dir: Path, *opts: str, config: Path = DEMO_RANDOM,
              flags: tuple[str, ...] = ("--device", "cpu")) -> list[str | Path]:
    """main.py on the tiny presets and 64 px tiles; later ``opts`` override the defaults."""
    return ["main.py", "--config", config, *flags, "--opts", f"data.root={data_root}", "testbed.dataset=null",
            "data.num_workers=0", f"work_dir={work_dir}", f"model.image_size={SIZE}", "train.batch_size=2",
            "train.max_iters=2", "inference.batch_size=2", *opts]


def script_args(name: str, run: Path, *args: str | Path) -> list[str | Path]:
    return [f"visualization_utils/{name}.py", "--config", run / "config.yaml", "--checkpoint", run / "latest.pth",
            "--device", "cpu", *args]


def run(argv: list[str | Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def one_error_line(result: subprocess.CompletedProcess, status: int = 2) -> str:
    """The single ``error:`` line of a failed CLI call (progress bars may precede it on stderr).

    ``status`` 2: the command refused its input; 1: predict_slide reported a bad slide of the cohort
    (and went on with the others).
    """
    assert result.returncode == status, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert result.stderr.rstrip().endswith(errors[0])  # nothing after it
    return errors[0]


# --- the matrix: each row builds a bad input and says what the error line must name -------------

Row = Callable[[Path, pytest.FixtureRequest], tuple]
"""(argv, parts the error line must hold[, exit status when not 2])."""
ROWS: dict[str, Row] = {}


def row(function: Row) -> Row:
    ROWS[function.__name__] = function
    return function


def first_train_tile(root: Path) -> Path:
    return sorted((root / "train").glob("*.png"))[0]


def first_val_mask(root: Path) -> Path:
    return sorted((root / "val" / "mask").glob("*.png"))[0]


@row
def missing_data_root(tmp_path, request):
    root = tmp_path / "no_such_dataset"
    return main_args(root, tmp_path / "run"), [f"dataset root {root} not found", "expected <root>/train/*.png"]


@row
def empty_split_folder(tmp_path, request):
    root = copy_data(request.getfixturevalue("clean_data"), tmp_path)
    for tile in (root / "train").glob("*.png"):
        tile.unlink()
    return main_args(root, tmp_path / "run"), [f"{root / 'train'} holds no tiles", ".png/.jpg/.jpeg/.tif/.tiff/.bmp"]


@row
def train_file_without_label(tmp_path, request):
    root = copy_data(request.getfixturevalue("clean_data"), tmp_path)
    tile = first_train_tile(root)
    bare = tile.with_name(tile.name.split("[")[0] + ".png")
    tile.rename(bare)
    return main_args(root, tmp_path / "run"), [str(bare), "no [...] label group", "[bbbb]"]


@row
def train_file_with_3_digit_label(tmp_path, request):
    root = copy_data(request.getfixturevalue("clean_data"), tmp_path)
    tile = first_train_tile(root)
    short = tile.with_name(tile.name.split("[")[0] + "[110].png")
    tile.rename(short)
    return main_args(root, tmp_path / "run"), [str(short), "invalid label [110]", "4 binary digits"]


@row
def corrupt_png_header(tmp_path, request):
    root = copy_data(request.getfixturevalue("clean_data"), tmp_path)
    tile = first_train_tile(root)
    tile.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8)
    return main_args(root, tmp_path / "run"), [str(tile), "not a readable image"]


@row
def truncated_png_read_by_a_loader_worker(tmp_path, request):
    root = copy_data(request.getfixturevalue("clean_data"), tmp_path)
    tile = first_train_tile(root)
    tile.write_bytes(tile.read_bytes()[:200])  # the header passes the data check; decoding fails in training
    # A worker process reads it: the worker's traceback must not leak into the message.
    return main_args(root, tmp_path / "run", "data.num_workers=1"), [str(tile), "not a readable image", "truncated"]


@row
def mask_containing_7(tmp_path, request):
    root = copy_data(request.getfixturevalue("clean_data"), tmp_path)
    mask = first_val_mask(root)
    values = np.zeros((SIZE, SIZE), np.uint8)
    values[:8, :8] = 7
    Image.fromarray(values, mode="L").save(mask)
    return main_args(root, tmp_path / "run"), [str(mask), "invalid class values 7", "expected 0-4"]


@row
def mask_size_differs_from_image(tmp_path, request):
    root = copy_data(request.getfixturevalue("clean_data"), tmp_path)
    mask = first_val_mask(root)
    write_mask(mask, np.zeros((SIZE // 2, SIZE // 2), np.uint8), BCSS)
    image = root / "val" / "img" / mask.name
    return main_args(root, tmp_path / "run"), [str(mask), "mask size 32×32 does not match image", str(image),
                                               "64×64"]


@row
def mask_16_bit(tmp_path, request):
    root = copy_data(request.getfixturevalue("clean_data"), tmp_path)
    mask = first_val_mask(root)
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint16)).save(mask)
    return main_args(root, tmp_path / "run"), [str(mask), "mask has mode 'I;16' (16-bit grey)", "8-bit palette"]


@row
def mask_saved_as_jpeg(tmp_path, request):
    root = copy_data(request.getfixturevalue("clean_data"), tmp_path)
    mask = first_val_mask(root)
    jpeg = mask.with_suffix(".jpg")
    Image.open(mask).convert("L").save(jpeg)
    mask.unlink()
    return main_args(root, tmp_path / "run"), [str(jpeg), "JPEG mask refused", "lossy", "PNG or TIFF"]


@row
def semicolon_csv_without_a_filename_column(tmp_path, request):
    root = copy_data(request.getfixturevalue("clean_data"), tmp_path)
    names = sorted(p.name for p in (root / "train").glob("*.png"))
    (root / "labels.csv").write_text("file;TUM;STR;LYM;NEC\n" + "".join(f"{n};1;0;0;0\n" for n in names))
    return (main_args(root, tmp_path / "run", "data.label_csv=labels.csv"),
            [str(root / "labels.csv"), "no 'filename' column", "cells separated by semicolons"])


@row
def csv_row_naming_another_format(tmp_path, request):
    root = copy_data(request.getfixturevalue("clean_data"), tmp_path)
    tiles = sorted((root / "train").glob("*.png"))
    jpeg = tiles[0].with_name("first.jpg")
    Image.open(tiles[0]).convert("RGB").save(jpeg, quality=95)
    tiles[0].unlink()
    rows = "".join(f"{name},1,0,0,0\n" for name in ["first.png", *(t.name for t in tiles[1:])])
    (root / "labels.csv").write_text("filename,TUM,STR,LYM,NEC\n" + rows)
    return (main_args(root, tmp_path / "run", "data.label_csv=labels.csv"),
            [str(root / "labels.csv"), "row for first.png", "first.jpg is there"])


@row
def image_smaller_than_the_tile(tmp_path, request):
    run_dir = request.getfixturevalue("trained_run")
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.fromarray(np.full((SIZE // 2, SIZE // 2, 3), 200, np.uint8)).save(folder / "small_tile.png")
    argv = script_args("generate_cam", run_dir, "--input-dir", folder, "--out-dir", tmp_path / "out",
                       "--no-crf", "--no-tta")
    return argv, ["small_tile", "32×32 px, smaller than the 64×64 px tile"]


@row
def unknown_config_key(tmp_path, request):
    config = tmp_path / "typo.yaml"
    config.write_text(f"_base_: {DEMO_RANDOM}\ntrain:\n  epoch: 1\n", encoding="utf-8")
    argv = main_args(tmp_path / "data", tmp_path / "run", config=config)
    return argv, [str(config), "unknown key 'train.epoch'", "did you mean 'train.epochs'?"]


@row
def wrong_value_type(tmp_path, request):
    argv = main_args(tmp_path / "data", tmp_path / "run", "train.batch_size=two")
    return argv, [str(DEMO_RANDOM), "'train.batch_size' must be an integer, got 'two'"]


@row
def missing_checkpoint(tmp_path, request):
    checkpoint = tmp_path / "nowhere" / "latest.pth"
    argv = [*main_args(request.getfixturevalue("clean_data"), tmp_path / "run"), "--resume", checkpoint]
    return argv, [f"{checkpoint}: checkpoint not found"]


@row
def checkpoint_of_another_config(tmp_path, request):
    run_dir = request.getfixturevalue("trained_run")
    argv = script_args("evaluate_performance", run_dir, "--opts", "model.prototypes_per_class=2",
                       "--no-crf", "--no-tta", "--out", tmp_path)
    return argv, [str(run_dir / "latest.pth"), "does not fit the model of this config", "prototypes.prototypes"]


@row
def conch_file_with_missing_keys(tmp_path, request):
    weights = request.getfixturevalue("conch_missing_key")
    argv = main_args(request.getfixturevalue("clean_data"), tmp_path / "run", f"model.conch.checkpoint={weights}")
    return argv, [str(weights), "does not fit preset 'tiny'", "missing: visual.ln_contrast.bias"]


@row
def pickled_object_in_checkpoint(tmp_path, request):
    checkpoint = tmp_path / "untrusted.pth"
    torch.save({"format": FORMAT, "model": {"w": torch.zeros(2)}, "payload": ArbitraryObject()}, checkpoint)
    argv = [*main_args(request.getfixturevalue("clean_data"), tmp_path / "run"), "--resume", checkpoint]
    return argv, [str(checkpoint), "refused by weights-only loading", "pickled Python object", "ArbitraryObject"]


@row
def work_dir_not_writable(tmp_path, request):
    # chmod cannot stop root (CI runs tests as root); a path through a regular file stops everyone.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    work_dir = blocker / "run"
    argv = main_args(request.getfixturevalue("clean_data"), work_dir)
    return argv, [str(work_dir), "not writable", f"{blocker} is a file, not a folder"]


@row
def inference_output_dir_not_writable(tmp_path, request):
    run_dir = request.getfixturevalue("trained_run")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = script_args("generate_cam", run_dir, "--split", "val", "--out-dir", blocker / "masks", "--no-crf", "--no-tta")
    return argv, [str(blocker / "masks"), f"{blocker} is a file, not a folder"]


@row
def cuda_device_without_cuda(tmp_path, request):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    argv = main_args(request.getfixturevalue("clean_data"), tmp_path / "run", flags=("--gpu", "0"))
    return argv, ["cuda:0 was requested", "no usable CUDA device", "--device cpu"]


SLIDE_FAILED = 1
"""Exit status of predict_slide when a slide of the cohort failed (the others go on; cohort.csv names it)."""


def slide_args(run_dir: Path, slide: Path, out_dir: Path) -> list[str | Path]:
    return script_args("predict_slide", run_dir, slide, "--out-dir", out_dir, "--no-tta", "--no-crf")


@row
def slide_file_that_is_not_a_slide(tmp_path, request):
    fake = tmp_path / "notes.svs"
    fake.write_text("a text file with a slide's name")
    argv = slide_args(request.getfixturevalue("trained_run"), fake, tmp_path / "out")
    return argv, [str(fake), "not a slide OpenSlide can read"], SLIDE_FAILED


@row
def folder_given_as_a_slide(tmp_path, request):
    folder = tmp_path / "scans.svs"
    folder.mkdir()
    argv = slide_args(request.getfixturevalue("trained_run"), folder, tmp_path / "out")
    return argv, [str(folder), "is a folder, not a slide file"]


@row
def slide_without_resolution_and_no_mpp_flag(tmp_path, request):
    slide = tmp_path / "no_mpp.tif"
    write_synthetic_slide(slide, 600, 400, mpp=None)
    argv = slide_args(request.getfixturevalue("trained_run"), slide, tmp_path / "out")
    return argv, [str(slide), "does not state its resolution", "--mpp"], SLIDE_FAILED


@row
def slide_output_dir_not_writable(tmp_path, request):
    slide = tmp_path / "slide.tif"
    write_synthetic_slide(slide, 600, 400, mpp=0.5)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = slide_args(request.getfixturevalue("trained_run"), slide, blocker / "masks")
    return argv, [str(blocker / "masks"), f"{blocker} is a file, not a folder"]


@row
def slide_without_tissue(tmp_path, request):
    slide = tmp_path / "glass.tif"
    write_synthetic_slide(slide, 600, 400, mpp=0.5, tissue=False)
    argv = slide_args(request.getfixturevalue("trained_run"), slide, tmp_path / "out")
    return argv, [str(slide), "no tissue found"], SLIDE_FAILED


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input_ends_in_one_clear_line(name, tmp_path, request):
    argv, expected, *status = ROWS[name](tmp_path, request)
    line = one_error_line(run(argv), *status)
    print(f"{name}: {line}")  # the matrix as users see it (pytest -rP)
    for part in expected:
        assert part in line, f"{part!r} not in {line!r}"


def test_debug_shows_the_traceback(tmp_path):
    result = run([*main_args(tmp_path / "data", tmp_path / "run", "train.batch_size=two"), "--debug"])
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "construct.errors.ConfigError" in result.stderr and "'train.batch_size' must be an integer" in result.stderr


def test_conch_loader_names_the_missing_key(conch_missing_key):
    with pytest.raises(CheckpointError) as info:
        load_conch(str(conch_missing_key), image_size=SIZE, preset="tiny")
    message = str(info.value)
    assert str(conch_missing_key) in message and "missing: visual.ln_contrast.bias" in message
    assert "\n" not in message


def test_grey_and_rgba_tiles_are_accepted_and_converted(clean_data, tmp_path):
    root = copy_data(clean_data, tmp_path)
    grey = np.tile(np.arange(SIZE, dtype=np.uint8) * 4, (SIZE, 1))
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., :3] = (120, 60, 30)
    rgba[:, : SIZE // 2, 3] = 255  # left half opaque, right half transparent
    train_tiles = sorted((root / "train").glob("*.png"))
    Image.fromarray(grey, mode="L").save(train_tiles[0])
    Image.fromarray(rgba, mode="RGBA").save(train_tiles[1])
    val_image = sorted((root / "val" / "img").glob("*.png"))[0]
    Image.fromarray(grey, mode="L").save(val_image)

    dataset = TrainDataset(root, BCSS, augment=False)
    grey_item, rgba_item = dataset[0]["image"], dataset[1]["image"]
    assert grey_item.shape == rgba_item.shape == (3, SIZE, SIZE) and grey_item.dtype == torch.float32
    for channel in range(3):
        assert torch.equal(grey_item[channel], torch.from_numpy(grey).float() / 255)
    assert torch.allclose(rgba_item[:, :, 0], torch.tensor([120, 60, 30]).float()[:, None] / 255)
    assert torch.equal(rgba_item[:, :, -1], torch.ones(3, SIZE))  # transparent → white slide background
    val_item = EvalDataset(root, "val", BCSS)[0]
    assert val_item["image"].shape == (3, SIZE, SIZE) and val_item["mask"].shape == (SIZE, SIZE)
