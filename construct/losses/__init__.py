"""The three ConStruct training losses."""

from construct.losses.classification import classification_loss
from construct.losses.contrastive import FgBgContrastiveLoss, MemoryBank, adaptive_fg_masks, info_nce
from construct.losses.structural import affinity, relational_affinity_loss

__all__ = [
    "FgBgContrastiveLoss",
    "MemoryBank",
    "adaptive_fg_masks",
    "affinity",
    "classification_loss",
    "info_nce",
    "relational_affinity_loss",
]
