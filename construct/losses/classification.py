"""Image-level multi-label classification loss on GAP logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE with logits against the 4-bit image label (B×C each)."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
