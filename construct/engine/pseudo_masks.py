"""Stage 1's pseudo-masks of the train split, cached on disk for stage 2.

Each train tile is predicted once by the stage-1 checkpoint, gated by the tile's own image-level
labels (the ``ground_truth`` presence protocol, as ``generate_cam.py --split train``), with the
config's TTA and CRF. Stage 2 reads them every epoch, so they are made once and kept rather than
recomputed per batch: a CONCH pass per TTA view and a CRF per tile would cost more than the
segmenter's own step, and a resumed run reads the very masks it started with.

The cache lives in ``<folder>/<key>/``, ``key`` a hash of the stage-1 checkpoint file's bytes,
the train tiles (names and sizes) and every setting that shapes the masks (data, model,
inference). A new stage-1 checkpoint or another setting gives a new key, so a stale cache is
never read. Tiles are written one file each into ``<key>.partial/`` (an interrupted run keeps
what it made) and the folder is renamed to ``<key>`` with a manifest once all are there.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from construct.atomic import atomic_path, write_text_atomic
from construct.config import Config
from construct.data.datasets import TrainDataset
from construct.engine.distributed import DistInfo, barrier
from construct.inference.predictor import Prediction, Predictor
from construct.models.build import load_trained_model

IGNORE_INDEX = 255
"""Label of pixels left out of the loss."""
MANIFEST = "manifest.json"
CHANNELS = ("mask", "argmax_before_crf", "confidence")
"""What each tile's cached H×W uint8 planes hold: the pseudo-mask (after CRF and background prior),
stage 1's argmax before the CRF, and the top class's share of stage 1's probabilities (× 255)."""


def cache_key(stage1_checkpoint: Path, config: Config, tiles: TrainDataset) -> str:
    """A short hash of everything the pseudo-masks depend on (see the module docstring)."""
    digest = hashlib.sha256()
    with open(stage1_checkpoint, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    data = asdict(config.data)
    settings = {
        "data": {key: data[key] for key in ("classes", "background", "label_csv", "split_folders", "background_prior")},
        "root": str(Path(config.data.root).resolve()),
        "model": asdict(config.model),
        "inference": {k: v for k, v in asdict(config.inference).items() if k not in ("batch_size", "slide")},
        "tiles": [(p.name, p.stat().st_size) for p in tiles.paths],
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def encode(prediction: Prediction) -> np.ndarray:
    """The cached 3×H×W uint8 planes of one prediction (:data:`CHANNELS`)."""
    probs = prediction.probs
    share = probs.max(axis=0) / np.maximum(probs.sum(axis=0), 1e-6)
    confidence = np.clip(np.round(share * 255.0), 0, 255).astype(np.uint8)
    return np.stack([prediction.mask, probs.argmax(axis=0).astype(np.uint8), confidence])


class PseudoMasks:
    """A complete cache folder: the planes of each train tile by name."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.manifest: dict[str, Any] = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))

    @property
    def key(self) -> str:
        return self.folder.name

    def planes(self, name: str) -> np.ndarray:
        return np.load(self.folder / f"{name}.npy")

    def labels(self, name: str, ignore: str, confidence_threshold: float) -> torch.Tensor:
        """H×W int64 training target: the pseudo-mask, :data:`IGNORE_INDEX` where ``ignore`` says.

        ``crf_changed``: where the CRF moved stage 1's argmax; ``low_confidence``: where the top
        class holds less than ``confidence_threshold`` of stage 1's probabilities.
        """
        mask, before_crf, confidence = self.planes(name).astype(np.int64)
        if ignore == "crf_changed":
            mask = np.where(mask != before_crf, IGNORE_INDEX, mask)
        elif ignore == "low_confidence":
            mask = np.where(confidence < confidence_threshold * 255.0, IGNORE_INDEX, mask)
        return torch.from_numpy(mask)


def make_pseudo_masks(config: Config, stage1_checkpoint: Path, tiles: TrainDataset, root: Path,
                      dist_info: DistInfo) -> PseudoMasks:
    """The cache of ``stage1_checkpoint``'s pseudo-masks of ``tiles`` under ``root``, made if missing.

    Under torchrun every rank predicts its share of the missing tiles; rank 0 completes the folder.
    """
    key = cache_key(stage1_checkpoint, config, tiles)
    folder = root / key
    if not (folder / MANIFEST).is_file():
        partial = root / f"{key}.partial"
        partial.mkdir(parents=True, exist_ok=True)
        names = [path.stem for path in tiles.paths]
        missing = [i for i, name in enumerate(names) if not (partial / f"{name}.npy").is_file()]
        mine = missing[dist_info.rank::dist_info.world_size]
        if mine:
            _predict(config, stage1_checkpoint, Subset(tiles, mine), partial, dist_info)
        barrier(dist_info)
        if dist_info.is_main:
            manifest = {"stage1_checkpoint": str(stage1_checkpoint), "tiles": len(names), "protocol": "ground_truth",
                        "crf": config.inference.crf.enabled, "tta": {"mode": config.inference.tta,
                                                                     "factors": config.inference.tta_factors,
                                                                     "flip": config.inference.tta_flip},
                        "planes": list(CHANNELS)}
            write_text_atomic(partial / MANIFEST, json.dumps(manifest, indent=2) + "\n")
            os.replace(partial, folder)
        barrier(dist_info)
    return PseudoMasks(folder)


def _predict(config: Config, stage1_checkpoint: Path, tiles: Dataset, out: Path, dist_info: DistInfo) -> None:
    model = load_trained_model(config, stage1_checkpoint, dist_info.device)
    loader = DataLoader(tiles, batch_size=config.inference.batch_size, num_workers=config.data.num_workers)
    workers = None if not dist_info.enabled else max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    with Predictor(model, config, dist_info.device, tta=True, crf=config.inference.crf.enabled, workers=workers) as predictor, \
            tqdm(total=len(tiles), desc="pseudo-masks", unit="tile", dynamic_ncols=True,
                 disable=not dist_info.is_main) as progress:
        for batch in loader:
            predictions = predictor.predict_batch(batch["image"], batch["label"], "ground_truth", batch["name"])
            for name, prediction in zip(batch["name"], predictions):
                with atomic_path(out / f"{name}.npy") as tmp, open(tmp, "wb") as handle:
                    np.save(handle, encode(prediction))
            progress.update(len(predictions))
