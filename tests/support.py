"""What several test modules share: the checkout's paths, fixtures and configs, and the class sets of
the dataset presets, read as users read them."""

from __future__ import annotations

from pathlib import Path

from construct.classes import ClassSet
from construct.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
HE_FIXTURE = FIXTURES / "he_cmu1_crop_768.png"
"""A 768x768 crop of real H&E (CMU-1, OpenSlide test data; tests/fixtures/README.md)."""
DEMO = REPO / "configs" / "demo.yaml"
"""The demo: testbed towers (pretrained on first use) on synthetic tiles."""
DEMO_RANDOM = REPO / "configs" / "demo_random.yaml"
"""The demo's architecture with random tiny towers: the fast tests' configuration."""
BCSS = ClassSet.from_config(load_config(REPO / "configs" / "datasets" / "bcss_wsss.yaml"))
LUAD = ClassSet.from_config(load_config(REPO / "configs" / "datasets" / "luad_histoseg.yaml"))


def tiny_config(*overrides: str) -> Config:
    """The demo's architecture with random tiny towers at 64 px, plus ``overrides``."""
    return load_config(DEMO_RANDOM, ["model.image_size=64", *overrides])
