"""Relational structural distillation: match token-affinity matrices (method.md §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def affinity(features: torch.Tensor) -> torch.Tensor:
    """B×C×H×W → B×HW×HW cosine similarities between all pairs of positions."""
    tokens = F.normalize(features.flatten(2).transpose(1, 2).float(), dim=-1)
    return tokens @ tokens.transpose(1, 2)


def relational_affinity_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """MSE between the student's and the teacher's affinity matrices.

    The teacher map is resized (bilinear) to the student grid first, so stages of any resolution
    can guide any pyramid level; its channel count may differ from the student's.
    """
    if teacher_map.shape[-2:] != student_map.shape[-2:]:
        teacher_map = F.interpolate(teacher_map.float(), size=student_map.shape[-2:], mode="bilinear", align_corners=False)
    return F.mse_loss(affinity(student_map), affinity(teacher_map).detach())
