"""CAM post-processing: from raw CAMs to (C+1)-channel class probabilities (method.md §7), and the
bright-background prior of datasets whose white areas are not tissue."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PROTOCOLS: tuple[str, ...] = ("predicted", "ground_truth")


def presence_from_logits(logits: torch.Tensor, gate: float) -> torch.Tensor:
    """Predicted class presence (B×C float 0/1): sigmoid(logit) > gate."""
    return (torch.sigmoid(logits.float()) > gate).float()


def select_presence(protocol: str, logits: torch.Tensor, gate: float,
                    presence_gt: torch.Tensor | None) -> torch.Tensor:
    """Class presence (B×C float 0/1) under ``protocol``: predicted from the logits, or the given ground truth."""
    if protocol == "predicted":
        return presence_from_logits(logits, gate)
    if protocol != "ground_truth":
        raise ValueError(f"unknown presence protocol {protocol!r}; expected one of {PROTOCOLS}")
    if presence_gt is None:
        raise ValueError("the ground_truth presence protocol needs the ground-truth class presence")
    return presence_gt.to(logits.device).float()


def normalize_cams(cams: torch.Tensor) -> torch.Tensor:
    """ReLU then per-image, per-class min-max scaling to [0, 1]."""
    cams = cams.float().relu()
    low = cams.amin(dim=(2, 3), keepdim=True)
    high = cams.amax(dim=(2, 3), keepdim=True)
    return (cams - low) / (high - low).clamp_min(1e-5)


def cam_probabilities(cams: torch.Tensor, presence: torch.Tensor, size: tuple[int, int],
                      background_power: float, normalized: bool = False,
                      align_corners: bool = False) -> torch.Tensor:
    """Normalised, presence-gated CAMs upsampled to ``size`` plus a background channel.

    ``normalized``: the CAMs are already in [0, 1] (each TTA pass was scaled, ``inference.cam_normalization:
    per_pass``) and are not rescaled. Returns B×(C+1)×H×W; the last channel is
    (1 − max_c CAM_c) ** background_power.
    """
    scaled = cams.float() if normalized else normalize_cams(cams)
    gated = scaled * presence.float()[:, :, None, None]
    gated = F.interpolate(gated, size=size, mode="bilinear", align_corners=align_corners).clamp(0.0, 1.0)
    background = (1.0 - gated.amax(dim=1, keepdim=True)) ** background_power
    return torch.cat([gated, background], dim=1)


def apply_background_prior(mask: np.ndarray, image: np.ndarray, grey_threshold: int, min_size: int,
                           background: int) -> np.ndarray:
    """Force bright pixels (grey = mean of R, G, B above ``grey_threshold``) of ``mask`` to ``background``.

    Bright connected regions smaller than ``min_size`` pixels are left as predicted (TPRO and
    WSSS-Tissue remove such small holes first: a bright nucleus halo is not an alveolus).
    """
    from scipy import ndimage  # deferred: only datasets with the prior need it

    bright = image.astype(np.float32).mean(axis=2) > grey_threshold
    if min_size > 1 and bright.any():
        labels, count = ndimage.label(bright)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        keep = sizes >= min_size
        keep[0] = False
        bright = keep[labels]
    return np.where(bright, np.uint8(background), mask).astype(np.uint8)
