"""Stage 2 on tiny presets at 64 px: the segmenter trains from a stage-1 checkpoint's cached pseudo-masks,
resumes exactly after a kill, and every inference command (evaluate, export, slides) takes its checkpoint;
a checkpoint of the wrong stage is one error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support import BCSS, DEMO_RANDOM, REPO

import construct
import construct.engine.pseudo_masks as pseudo_module
from construct.checkpoint import load_checkpoint
from construct.cli import run_cli
from construct.commands import evaluate, export, predict_slides, train, train_seg
from construct.config import load_config
from construct.data.datasets import train_dataset
from construct.engine.distributed import DistInfo
from construct.engine.segmenter_trainer import train_segmenter
from construct.engine.trainer import train as train_stage1
from construct_lab.synthetic.slide import write_synthetic_slide
from construct_lab.synthetic.tiles import generate_dataset

CPU = DistInfo(device=torch.device("cpu"))
ITERATIONS = 6  # 12 tiles / batch 4 = 3 iterations per epoch: two epochs, validation at 3 and 6


def opts(root: Path, stage2_dir: Path) -> list[str]:
    return [f"data.root={root / 'data'}", "testbed.dataset=null", "data.num_workers=0", f"work_dir={root / 'stage1'}",
            "model.image_size=64", "inference.batch_size=4", "inference.tta_factors=[1.0]", "inference.crf.iterations=2",
            f"stage2.work_dir={stage2_dir}", f"stage2.iterations={ITERATIONS}", "stage2.batch_size=4",
            "stage2.eval_interval=3", "stage2.checkpoint_interval=1", "stage2.log_interval=1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A 2-iteration stage-1 run (tiny random towers) on 12/4/4 synthetic 64-px tiles."""
    base = tmp_path_factory.mktemp("stage2")
    generate_dataset(base / "data", n_train=12, n_val=4, n_test=4, seed=0, classes=BCSS, size=64)
    config = load_config(DEMO_RANDOM, [*opts(base, base / "unused"), "train.max_iters=2", "train.batch_size=4",
                                       "loss.sim_weight=0"])
    train_stage1(config, CPU)
    return base


@pytest.fixture(scope="module")
def reference(root) -> Path:
    """An uninterrupted stage-2 run, in this process, on one thread as the resumed runs below (sums over
    several threads may round differently)."""
    work_dir = root / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_segmenter(load_config(DEMO_RANDOM, opts(root, work_dir)), CPU)
    finally:
        torch.set_num_threads(threads)
    assert result.iterations == ITERATIONS and result.work_dir == work_dir
    return work_dir


def test_stage2_run_folder_checkpoints_and_pseudo_mask_cache(root, reference, monkeypatch):
    for name in ("config.yaml", "latest.pth", "best.pth", "log.jsonl"):
        assert (reference / name).is_file(), name
    latest = load_checkpoint(reference / "latest.pth")
    assert latest["stage"] == 2 and latest["iteration"] == ITERATIONS and latest["classes"] == list(BCSS.names)
    assert latest["architecture"] == {"backbone": "segformer", "preset": "tiny", "num_labels": 5}
    records = [json.loads(line) for line in (reference / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "val"] == [3, 6]
    assert all(0.0 <= r["miou"] <= 100.0 for r in records if r["kind"] == "val")

    caches = list((root / "stage1" / "pseudo_masks").iterdir())
    assert [p.name for p in caches] == [latest["pseudo_masks"]["key"]]  # complete: no .partial folder left
    planes = sorted(caches[0].glob("*.npy"))
    assert len(planes) == 12
    mask, before_crf, confidence = np.load(planes[0])
    assert mask.shape == (64, 64) and mask.max() <= 4 and before_crf.max() <= 4
    manifest = json.loads((caches[0] / "manifest.json").read_text())
    assert manifest["protocol"] == "ground_truth" and manifest["crf"] is True

    # A second run reads the cache; a changed stage-1 checkpoint makes a new one.
    config = load_config(DEMO_RANDOM, [*opts(root, reference), "stage2.iterations=1"])
    tiles = train_dataset(config)
    stage1 = root / "stage1" / "best.pth"
    key = pseudo_module.cache_key(stage1, config, tiles)
    assert key == latest["pseudo_masks"]["key"]
    monkeypatch.setattr(pseudo_module, "_predict", lambda *args: pytest.fail("the cache was not used"))
    pseudo_module.make_pseudo_masks(config, stage1, tiles, root / "stage1" / "pseudo_masks", CPU)
    changed = root / "changed.pth"
    changed.write_bytes(stage1.read_bytes() + b"\0")
    assert pseudo_module.cache_key(changed, config, tiles) != key


LAUNCHER = '''
import os, runpy, signal, sys

from construct.models.segmenter import Segmenter

at = int(os.environ["KILL_AT"])
real_forward = Segmenter.forward
calls = [0]

def forward(self, images):
    if self.training:  # one call per training iteration; validation runs in eval mode
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_forward(self, images)

if __name__ == "__main__":  # not in the CRF pool's spawned workers, which import this file too
    Segmenter.forward = forward
    sys.argv = sys.argv[1:]
    runpy.run_module("construct.commands.train_seg", run_name="__main__")
'''


def test_killed_stage2_run_resumes_to_the_same_weights(root, reference, tmp_path):
    work_dir = tmp_path / "run"
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER, encoding="utf-8")
    args = ["--config", str(DEMO_RANDOM), "--device", "cpu", "--opts", *opts(root, work_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "KILL_AT": "5"}
    killed = subprocess.run([sys.executable, str(launcher), "train_seg", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert load_checkpoint(work_dir / "latest.pth")["iteration"] == 4

    resumed = subprocess.run([sys.executable, "-m", "construct.commands.train_seg", "--resume", *args], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"done: {ITERATIONS} iterations" in resumed.stdout
    expected, got = load_checkpoint(reference / "latest.pth"), load_checkpoint(work_dir / "latest.pth")
    assert got["iteration"] == ITERATIONS and expected["model"].keys() == got["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(value, got["model"][key]), key


def one_error_line(module, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, module.build_parser(), argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def test_a_checkpoint_of_the_wrong_stage_is_one_line(root, reference, tmp_path, capsys):
    stage1, stage2 = root / "stage1" / "best.pth", reference / "best.pth"
    base = ["--config", str(DEMO_RANDOM), "--device", "cpu"]
    line = one_error_line(train_seg, [*base, "--resume", str(stage1), "--opts", *opts(root, tmp_path / "a")], capsys)
    assert str(stage1) in line and "stage-1" in line and "needs a stage-2" in line
    line = one_error_line(train_seg, [*base, "--opts", *opts(root, tmp_path / "b"), f"stage2.checkpoint={stage2}"],
                          capsys)
    assert str(stage2) in line and "is a stage-2" in line and "stage2.checkpoint" in line
    line = one_error_line(train, [*base, "--resume", str(stage2), "--opts", *opts(root, tmp_path / "c")], capsys)
    assert str(stage2) in line and "is a stage-2" in line and "needs a stage-1" in line


def test_inference_commands_take_a_stage2_checkpoint(root, reference, tmp_path, capsys):
    model = ["--config", str(reference / "config.yaml"), "--checkpoint", str(reference / "best.pth"), "--device", "cpu"]
    run_cli(evaluate.main, evaluate.build_parser(), [*model, "--split", "test", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "no presence gating" in out and "CRF off, TTA off" in out
    record = json.loads((tmp_path / "metrics_test_stage2.json").read_text())
    assert record["stage"] == 2 and record["protocol"] == "none" and record["images"] == 4
    assert np.array(record["confusion_matrix"]).sum() == 4 * 64 * 64
    run_cli(evaluate.main, evaluate.build_parser(), [*model, "--background", "ignored", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "metrics_test_stage2_background-ignored.json").read_text())["background"] == "ignored"

    run_cli(export.main, export.build_parser(), [*model, "--split", "val", "--save-cam", "--out-dir", str(tmp_path / "masks"),
                                                 "--opts", "stage2.tta_flip=true", "stage2.crf=true"])
    assert len(list((tmp_path / "masks").glob("*.png"))) == 4
    probs = np.load(sorted((tmp_path / "masks" / "cam").glob("*.npy"))[0]).astype(np.float32)
    assert probs.shape == (4, 64, 64) and probs.min() >= 0 and probs.sum(axis=0).max() <= 1.01
    info = json.loads((tmp_path / "masks" / "generate_cam.json").read_text())
    assert info["stage"] == 2 and info["cam_values"] == "class probabilities" and info["crf"] is True
    assert info["tta"]["flip"] is True and info["tta"]["forward_passes"] == 2

    with construct.load_segmenter(reference / "best.pth") as segmenter:  # the Python API, config.yaml beside it
        tile = segmenter.predict_tile(sorted((root / "data" / "test" / "img").glob("*.png"))[0])
    assert tile.mask.shape == (64, 64) and tile.prediction.protocol == "none" and tile.class_names == BCSS.all_names

    slide = tmp_path / "slide.tif"
    write_synthetic_slide(slide, 600, 500, mpp=0.5)
    run_cli(predict_slides.main, predict_slides.build_parser(), [str(slide), *model, "--out-dir", str(tmp_path / "slides")])
    names = {p.name for p in (tmp_path / "slides").iterdir()}
    assert {"cohort.csv", "cohort.json", "slide_areas.json", "slide_mask.tif", "slide_overview.png",
            "slide_regions.geojson"} <= names
    report = json.loads((tmp_path / "slides" / "slide_areas.json").read_text())
    assert report["crf"] is False and report["tta"]["mode"] == "off" and report["tiles"] > 0
    assert json.loads((tmp_path / "slides" / "slide_regions.geojson").read_text())["type"] == "FeatureCollection"
    assert json.loads((tmp_path / "slides" / "cohort.json").read_text())[0]["status"] == "done"
