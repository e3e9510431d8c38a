"""The offline CPU demo: the commands a user would type, run one after another.

``python -m construct_lab.demo`` (or ``make demo``) trains configs/demo.yaml — tiny random frozen
backbones on synthetic BCSS-format tiles generated on first use — then evaluates the test split
with CRF under both presence protocols, exports masks and overlays for a few test images and
draws one prototype figure; then stage 2 trains a tiny SegFormer on the run's pseudo-masks and
evaluates it (no presence gating). Each step is printed as the command it runs, so the demo
doubles as a walk-through of the real workflow.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from construct.classes import ClassSet
from construct.config import load_config
from construct.data.io import read_mask
from construct.engine.segmenter_trainer import stage2_work_dir
from construct_lab.paths import REPO

DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def run(command: list[str]) -> None:
    print(f"\n$ {shlex.join(command)}", flush=True)
    result = subprocess.run(command, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"demo step failed (exit {result.returncode}): {shlex.join(command)}")


def richest_test_image(root: Path, classes: ClassSet) -> str:
    """The test tile whose mask shows the most tissue classes: the most telling prototype figure."""
    masks = sorted((root / "test" / "mask").glob("*.png"))
    return max(masks, key=lambda path: len(set(np.unique(read_mask(path, classes)).tolist()) - {classes.background})).name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6, help="test images to export masks/overlays for (default 6)")
    args = parser.parse_args(argv)

    started = time.time()
    config = load_config(DEMO_CONFIG)
    classes = ClassSet.from_config(config)
    work_dir = Path(config.work_dir)  # relative to the repo root, where every step runs
    run_config = str(work_dir / "config.yaml")
    checkpoint = str(work_dir / "best.pth")
    python = sys.executable
    run([python, "main.py", "--config", str(DEMO_CONFIG.relative_to(REPO)), "--device", "cpu", "--overwrite"])
    run([python, "visualization_utils/evaluate_performance.py", "--config", run_config, "--checkpoint", checkpoint,
         "--split", "test", "--protocol", "both", "--device", "cpu"])
    run([python, "visualization_utils/generate_cam.py", "--config", run_config, "--checkpoint", checkpoint,
         "--split", "test", "--overlay", "--save-cam", "--max-images", str(args.images), "--device", "cpu"])
    run([python, "visualization_utils/visualize_prototypes.py", "--config", run_config, "--checkpoint", checkpoint,
         "--split", "test", "--images", richest_test_image(REPO / config.data.root, classes), "--device", "cpu"])
    stage2_dir = stage2_work_dir(config)
    run([python, "-m", "construct.commands.train_seg", "--config", str(DEMO_CONFIG.relative_to(REPO)), "--device", "cpu",
         "--overwrite"])
    run([python, "visualization_utils/evaluate_performance.py", "--config", str(stage2_dir / "config.yaml"),
         "--checkpoint", str(stage2_dir / "best.pth"), "--split", "test", "--device", "cpu"])

    metrics = {p: json.loads((REPO / work_dir / f"metrics_test_{p}.json").read_text())
               for p in ("predicted", "ground_truth")}
    segmenter = json.loads((REPO / stage2_dir / "metrics_test_stage2.json").read_text())
    print(f"\ndemo finished in {time.time() - started:.0f} s")
    for protocol, record in metrics.items():
        print(f"  stage 1: test mIoU {record['miou']:.2f}  mDice {record['mdice']:.2f}  (presence: {protocol}, CRF on, "
              f"background {record['background']}; mean over {'/'.join(classes.names)})")
    print(f"  stage 2: test mIoU {segmenter['miou']:.2f}  mDice {segmenter['mdice']:.2f}  (SegFormer on the pseudo-masks: "
          f"no presence gating, CRF off, background {segmenter['background']})")
    print(f"  data:        {config.data.root}/ (synthetic {config.data.name} layout: {classes.describe()})")
    print(f"  run:         {work_dir}/ (config.yaml, best.pth, latest.pth, log.jsonl)")
    print(f"  metrics:     {work_dir}/metrics_test_predicted.json, metrics_test_ground_truth.json")
    print(f"  masks:       {work_dir}/test_cams/ (palette PNGs; overlay/ and cam/ beside them)")
    print(f"  prototypes:  {work_dir}/prototypes/")
    print(f"  stage 2:     {stage2_dir}/ (config.yaml, best.pth, metrics_test_stage2.json); pseudo-masks cached in "
          f"{work_dir}/pseudo_masks/")


if __name__ == "__main__":
    main()
