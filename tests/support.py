"""What several test modules share: the class sets of the dataset presets, read as users read them."""

from __future__ import annotations

from pathlib import Path

from construct.classes import ClassSet
from construct.config import load_config

REPO = Path(__file__).resolve().parents[1]
BCSS = ClassSet.from_config(load_config(REPO / "configs" / "datasets" / "bcss_wsss.yaml"))
LUAD = ClassSet.from_config(load_config(REPO / "configs" / "datasets" / "luad_histoseg.yaml"))
