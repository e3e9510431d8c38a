"""Validation during training: mIoU and classification accuracy. The fast path maps CAMs to masks
without TTA or CRF, then applies the dataset's background prior as at test time;
``train.validation: full`` runs the whole inference pipeline instead."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from construct.classes import ClassSet
from construct.config import BackgroundPriorConfig, Config
from construct.data.datasets import same_size_batches
from construct.inference.postprocess import (
    apply_background_prior,
    cam_probabilities,
    presence_from_logits,
    select_presence,
)
from construct.inference.predictor import Predictor, to_uint8_images
from construct.inference.tiling import forward_any_size, window_stride
from construct.metrics import ConfusionMatrix
from construct.models.construct import ConStructModel


@torch.no_grad()
def validate(model: ConStructModel, loader: DataLoader, config: Config, device: torch.device) -> dict[str, Any]:
    """mIoU (``train.validation``: fast path or full pipeline) and per-class presence accuracy on an evaluation split.

    ``loader`` yields batches of one image size each (plain, or lists from
    :func:`~construct.data.datasets.collate_same_size`);
    each image is predicted at its own size and scored against its own mask.
    """
    was_training = model.training
    model.eval()
    classes = ClassSet.from_config(config)
    confusion = ConfusionMatrix(classes.all_names, device=device)
    prior = config.data.background_prior
    correct = total = 0
    inference = config.inference
    predictor = None
    if config.train.validation == "full":
        # The training student keeps the fast path train.fast_path gave it (inference.fast_path does not apply).
        own = dataclasses.replace(config, inference=dataclasses.replace(inference, fast_path=False))
        predictor = Predictor(model, own, device, tta=True, crf=inference.crf.enabled)
    try:
        for batch in same_size_batches(loader):
            images = batch["image"].to(device, non_blocking=True)
            masks = batch["mask"].to(device, non_blocking=True)
            truth = batch["presence"].to(device)
            if predictor is None:
                cams, logits = forward_any_size(partial(_cams_and_logits, model), images, config.model.image_size,
                                                window_stride(config), inference.batch_size, batch.get("name"))
                presence = select_presence(inference.presence, logits, inference.presence_gate, truth)
                probs = cam_probabilities(cams, presence, masks.shape[-2:], inference.background_power,
                                          align_corners=inference.upsample_align_corners)
                predicted_masks = probs.argmax(dim=1)
                if prior is not None:  # as the evaluation script and slide prediction apply it
                    predicted_masks = _with_background_prior(predicted_masks, images, prior, classes.background)
            else:
                cams, logits = predictor.network(images, batch.get("name"))
                predictions = predictor.postprocess(images, cams, logits, inference.presence, truth)
                predicted_masks = torch.from_numpy(np.stack([p.mask for p in predictions])).long().to(device)
            confusion.update(predicted_masks, masks)
            correct += int((presence_from_logits(logits, inference.presence_gate) == truth).sum())
            total += truth.numel()
    finally:
        if predictor is not None:
            predictor.close()  # stops the CRF workers, also when a batch fails
    model.train(was_training)
    metrics = confusion.compute(config.evaluation.background)
    return {"miou": metrics.miou, "mdice": metrics.mdice, "cls_accuracy": 100.0 * correct / max(total, 1)}


def _cams_and_logits(model: ConStructModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(images)
    return out.cams, out.logits


def _with_background_prior(masks: torch.Tensor, images: torch.Tensor, prior: BackgroundPriorConfig,
                           background: int) -> torch.Tensor:
    """``masks`` (B×H×W) with the dataset's bright pixels forced to ``background``."""
    forced = [apply_background_prior(mask, pixels, prior.grey_threshold, prior.min_size, background)
              for mask, pixels in zip(masks.to(torch.uint8).cpu().numpy(), to_uint8_images(images))]
    return torch.from_numpy(np.stack(forced)).long().to(masks.device)
