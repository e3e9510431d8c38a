"""Score a labelled split: the network once per image, masks under one or more presence protocols."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from construct.classes import ClassSet
from construct.config import Config
from construct.data.datasets import collate_same_size, same_size_batches
from construct.inference.predictor import Predictor
from construct.metrics import ConfusionMatrix, SegmentationMetrics


def evaluate_split(predictor: Predictor, dataset: Dataset, config: Config, protocols: Sequence[str],
                   description: str = "evaluate") -> dict[str, SegmentationMetrics]:
    """Metrics per protocol over every image of ``dataset`` (items with image, mask, name, presence), each
    image predicted at its own size and scored against its own mask."""
    loader = DataLoader(dataset, batch_size=config.inference.batch_size, num_workers=config.data.num_workers,
                        collate_fn=collate_same_size)
    names = ClassSet.from_config(config).all_names
    confusions = {protocol: ConfusionMatrix(names) for protocol in protocols}
    with tqdm(total=len(dataset), desc=description, unit="img", dynamic_ncols=True) as progress:
        for batch in same_size_batches(loader):
            cams, logits = predictor.network(batch["image"], batch["name"])
            for protocol in protocols:
                predictions = predictor.postprocess(batch["image"], cams, logits, protocol, batch["presence"])
                masks = torch.from_numpy(np.stack([p.mask for p in predictions])).long()
                confusions[protocol].update(masks, batch["mask"])
            progress.update(len(batch["name"]))
    background = config.evaluation.background
    return {protocol: confusion.compute(background) for protocol, confusion in confusions.items()}
