"""Inputs a config asks for that the entry points make before training: synthetic data, testbed towers.

``main.py``, the demo and the ablation call :func:`prepare_inputs`; the training loop itself only
reads ``data.root`` and the weight files, whoever made them.
"""

from __future__ import annotations

from pathlib import Path

from construct.classes import ClassSet
from construct.config import Config
from construct.engine.distributed import DistInfo, barrier


def prepare_inputs(config: Config, dist_info: DistInfo) -> None:
    """Generate the configured synthetic dataset and pretrain the testbed towers, if either is missing."""
    synthetic = config.testbed.dataset
    if synthetic is not None and dist_info.is_main:
        from construct_lab.synthetic.tiles import Layout, generate_dataset

        layout = Layout(textures=None if synthetic.textures is None else tuple(synthetic.textures),
                        label_format="csv" if config.data.label_csv else synthetic.label_format,
                        label_csv=config.data.label_csv or "labels.csv", val_folder=synthetic.val_folder,
                        alveoli=synthetic.alveoli)
        generate_dataset(config.data.root, synthetic.train, synthetic.val, synthetic.test, synthetic.seed,
                         ClassSet.from_config(config), size=config.model.image_size, style=synthetic.style,
                         layout=layout, painter=synthetic.painter)
    if config.testbed.seed is not None and dist_info.is_main:
        from construct_lab.testbed.pretrain import ensure_testbed

        ensure_testbed(Path(config.model.conch.checkpoint).parent, config.testbed.seed,
                       prompts=list(ClassSet.from_config(config).prompts))
    barrier(dist_info)
