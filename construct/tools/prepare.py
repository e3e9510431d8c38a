"""Inputs a config asks for that the entry points make before training: synthetic data, testbed towers.

``main.py``, the demo and the ablation call :func:`prepare_inputs`; the training loop itself only
reads ``data.root`` and the weight files, whoever made them.
"""

from __future__ import annotations

from pathlib import Path

from construct.config import Config
from construct.engine.distributed import DistInfo, barrier


def prepare_inputs(config: Config, dist_info: DistInfo) -> None:
    """Generate the configured synthetic dataset and pretrain the testbed towers, if either is missing."""
    synthetic = config.data.synthetic
    if synthetic is not None and dist_info.is_main:
        from construct.data.synthetic import generate_dataset

        generate_dataset(config.data.root, synthetic.train, synthetic.val, synthetic.test, synthetic.seed,
                         size=config.model.image_size, style=synthetic.style, painter=synthetic.painter)
    if config.model.testbed_seed is not None and dist_info.is_main:
        from construct.tools.testbed.pretrain import ensure_testbed

        ensure_testbed(Path(config.model.conch.checkpoint).parent, config.model.testbed_seed,
                       prompts=config.model.prompts)
    barrier(dist_info)
