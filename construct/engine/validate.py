"""Fast validation during training: CAM → mask without TTA or CRF, mIoU and classification accuracy."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from construct.classes import ClassSet
from construct.config import Config
from construct.inference.postprocess import cam_probabilities, presence_from_logits, select_presence
from construct.metrics import ConfusionMatrix
from construct.models.construct import ConStructModel


@torch.no_grad()
def validate(model: ConStructModel, loader: DataLoader, config: Config, device: torch.device) -> dict[str, Any]:
    """mIoU (fast path) and per-class presence accuracy on an evaluation split."""
    was_training = model.training
    model.eval()
    confusion = ConfusionMatrix(ClassSet.from_config(config).all_names, device=device)
    correct = total = 0
    inference = config.inference
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True)
        truth = batch["presence"].to(device)
        out = model(images)
        predicted = presence_from_logits(out.logits, inference.presence_gate)
        presence = select_presence(inference.presence, out.logits, inference.presence_gate, truth)
        probs = cam_probabilities(out.cams, presence, masks.shape[-2:], inference.background_power)
        confusion.update(probs.argmax(dim=1), masks)
        correct += int((predicted == truth).sum())
        total += truth.numel()
    model.train(was_training)
    metrics = confusion.compute(config.evaluation.background)
    return {"miou": metrics.miou, "mdice": metrics.mdice, "cls_accuracy": 100.0 * correct / max(total, 1)}
