"""The inference scripts end to end (subprocess, CPU) on a tiny checkpoint trained here on synthetic tiles."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import BCSS, DEMO_RANDOM, HE_FIXTURE, REPO

from construct.cli import run_cli
from construct.data.io import read_mask

SCRIPTS = REPO / "visualization_utils"
METRICS = ("miou", "mdice", "fwiou", "pixel_accuracy")


COMMANDS = {"evaluate_performance": "evaluate", "generate_cam": "export", "visualize_prototypes": "prototypes",
            "predict_slide": "predict_slides"}
"""The module in construct/commands behind each paper script."""


def script(name: str) -> dict:
    """The namespace of a script's command, for in-process calls that need no fresh interpreter."""
    return vars(importlib.import_module(f"construct.commands.{COMMANDS[name]}"))


def run_script(name: str, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def model_args(run: Path) -> list[str | Path]:
    return ["--config", run / "config.yaml", "--checkpoint", run / "best.pth", "--device", "cpu"]


def check_palette_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "P" and img.size == size
        assert img.getpalette()[:15] == [v for rgb in BCSS.palette for v in rgb]
    return read_mask(path, BCSS)  # raises on values outside 0-4


def test_evaluate_performance_both_protocols_with_crf(tiny_run, tmp_path):
    result = run_script("evaluate_performance", *model_args(tiny_run), "--split", "test", "--no-tta",
                        "--workers", "1", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    for protocol in ("predicted", "ground_truth"):
        assert f"presence protocol '{protocol}'" in result.stdout
        record = json.loads((tmp_path / f"metrics_test_{protocol}.json").read_text())
        assert record["protocol"] == protocol and record["split"] == "test" and record["images"] == 3
        assert record["crf"] is True and record["checkpoint"].endswith("best.pth")
        assert record["tta"] == {"mode": "off", "factors": [1.0], "flip": False, "forward_passes": 1}
        for key in METRICS:
            assert record[key] is None or 0.0 <= record[key] <= 100.0
        assert set(record["per_class"]) == set(BCSS.all_names)
        assert all(set(v) == {"iou", "dice"} for v in record["per_class"].values())
        assert np.array(record["confusion_matrix"]).sum() == 3 * 224 * 224
    for name in BCSS.all_names + ("mIoU", "mDice", "FwIoU", "PixAcc"):
        assert name in result.stdout


@pytest.mark.parametrize("mode", ["intensity", "resize"])
def test_scripts_run_and_name_each_tta_mode(tiny_run, tmp_path, capsys, mode):
    common = [*map(str, model_args(tiny_run)), "--opts", f"inference.tta={mode}", "--no-crf", "--max-images", "1"]
    evaluate = script("evaluate_performance")
    evaluate["main"](evaluate["build_parser"]().parse_args(
        [*common, "--split", "test", "--protocol", "predicted", "--out", str(tmp_path)]))
    used = {"mode": mode, "factors": [0.9, 1.0, 1.1], "flip": True, "forward_passes": 6}
    assert json.loads((tmp_path / "metrics_test_predicted.json").read_text())["tta"] == used
    assert f"TTA {mode} ×[0.9, 1.0, 1.1] + flip (6 passes)" in capsys.readouterr().out
    generate = script("generate_cam")
    generate["main"](generate["build_parser"]().parse_args([*common, "--split", "val", "--out-dir", str(tmp_path / "masks")]))
    assert len(list((tmp_path / "masks").glob("*.png"))) == 1
    assert json.loads((tmp_path / "masks" / "generate_cam.json").read_text())["tta"] == used


def test_generate_cam_on_val_writes_masks_cams_overlays(tiny_run):
    result = run_script("generate_cam", *model_args(tiny_run), "--split", "val", "--save-cam", "--overlay",
                        "--no-tta", "--no-crf", "--workers", "1")
    assert result.returncode == 0, result.stderr
    out = tiny_run / "val_cams"  # the default: beside the checkpoint
    masks = sorted(out.glob("*.png"))
    assert len(masks) == 2
    for mask_path in masks:
        check_palette_mask(mask_path, (224, 224))
        cams = np.load(out / "cam" / f"{mask_path.stem}.npy")
        assert cams.dtype == np.float16 and cams.shape == (4, 224, 224) and 0 <= cams.min() <= cams.max() <= 1
        with Image.open(out / "overlay" / mask_path.name) as overlay:
            assert overlay.mode == "RGB" and overlay.size == (224, 224)
    info = json.loads((out / "generate_cam.json").read_text())
    assert info["protocol"] == "predicted" and info["images"] == 2 and not list(out.rglob("*.tmp"))


def test_generate_cam_train_split_uses_image_labels(tiny_run, tmp_path):
    namespace = script("generate_cam")
    namespace["main"](namespace["build_parser"]().parse_args([
        *map(str, model_args(tiny_run)), "--split", "train", "--max-images", "2", "--out-dir", str(tmp_path),
        "--no-tta", "--no-crf"]))
    assert len(list(tmp_path.glob("*.png"))) == 2
    assert json.loads((tmp_path / "generate_cam.json").read_text())["protocol"] == "ground_truth"


def test_generate_cam_tiles_a_large_real_image(tiny_run, tmp_path):
    inputs = tmp_path / "slides"
    inputs.mkdir()
    shutil.copy(HE_FIXTURE, inputs)
    result = run_script("generate_cam", *model_args(tiny_run), "--input-dir", inputs, "--out-dir", tmp_path / "out",
                        "--no-tta", "--no-crf")
    assert result.returncode == 0, result.stderr
    mask = check_palette_mask(tmp_path / "out" / "he_cmu1_crop_768.png", (768, 768))
    assert set(np.unique(mask)) <= set(range(5))


def test_visualize_prototypes_draws_figures(tiny_run, tmp_path):
    name = sorted((tiny_run.parent / "data" / "val" / "img").glob("*.png"))[0].name
    result = run_script("visualize_prototypes", *model_args(tiny_run), "--split", "val", "--images", name,
                        "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    figure = tmp_path / f"{Path(name).stem}_prototypes.png"
    assert figure.stat().st_size > 10_000
    with Image.open(figure) as img:
        assert img.size[0] > 600 and img.size[1] > 300


def test_visualize_prototypes_unknown_image(tiny_run, capsys):
    namespace = script("visualize_prototypes")
    argv = [*map(str, model_args(tiny_run)), "--split", "val", "--images", "missing.png"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(namespace["main"], namespace["build_parser"](), argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "missing.png" in error and "looked for" in error and str(tiny_run.parent / "data" / "val" / "img") in error


@pytest.mark.parametrize("name", ["evaluate_performance", "generate_cam", "visualize_prototypes"])
def test_help_mentions_every_option(name, capsys):
    parser = script(name)["build_parser"]()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    assert {"--config", "--checkpoint", "--gpu", "--device"} <= set(options)
    for option in options:
        assert option in text, option
    assert all(action.help for action in parser._actions)


def test_unavailable_gpu_is_a_one_line_error(tmp_path):
    missing = torch.cuda.device_count()  # one past the last CUDA device: never available
    result = run_script("evaluate_performance", "--config", DEMO_RANDOM,
                        "--checkpoint", tmp_path / "none.pth", "--gpu", missing)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and f"cuda:{missing}" in lines[0]
