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

# Every command-line entry point that runs from a clone (tests/test_layout.py runs each one's --help;
# the console scripts of pyproject.toml are run by tests/test_install.py).
ENTRY_POINTS = [
    ["main.py"],
    ["visualization_utils/evaluate_performance.py"],
    ["visualization_utils/generate_cam.py"],
    ["visualization_utils/visualize_prototypes.py"],
    ["visualization_utils/predict_slide.py"],
    ["-m", "construct.commands.train_seg"],
    ["-m", "construct.commands.check_data"],
    ["-m", "construct.commands.check_prompts"],
    ["-m", "construct_lab.synthetic.tiles"],
    ["-m", "construct_lab.synthetic.slide"],
    ["-m", "construct_lab.ablate"],
    ["-m", "construct_lab.bench"],
    ["-m", "construct_lab.bench_slide"],
    ["-m", "construct_lab.bench_data_check"],
    ["-m", "construct_lab.demo"],
    ["-m", "construct_lab.pretrain_tiny"],
    ["-m", "construct_lab.config_reference"],
    ["-m", "construct_lab.gpu_check"],
]
