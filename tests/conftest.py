"""Shared test set-up: every test starts from the same torch seed; the fixtures several modules use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import BCSS, DEMO_RANDOM

from construct.config import load_config
from construct.engine.distributed import DistInfo
from construct.engine.trainer import train
from construct_lab.synthetic.tiles import generate_dataset


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three random 64-px images and their labels: one pair of classes, one class, all four."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 64, 64, generator=generator)
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    return images, labels


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A trained run folder (config.yaml, best.pth, latest.pth) for the modules that need a checkpoint:
    2 iterations of the tiny random model at 224 px (cls + struct) on 8/2/3 synthetic BCSS tiles
    (the data folder beside it)."""
    root = tmp_path_factory.mktemp("tiny_run")
    generate_dataset(root / "data", n_train=8, n_val=2, n_test=3, seed=0, classes=BCSS)
    config = load_config(DEMO_RANDOM, [
        f"data.root={root / 'data'}", f"work_dir={root / 'run'}", "testbed.dataset=null", "data.num_workers=0",
        "train.max_iters=2", "train.batch_size=4", "inference.batch_size=4", "loss.sim_weight=0",
    ])
    train(config, DistInfo(device=torch.device("cpu")))
    return root / "run"
