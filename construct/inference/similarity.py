"""Per-prototype cosine-similarity maps: where each learned prototype matches the refined features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from construct.models.construct import ConStructModel


@torch.no_grad()
def prototype_similarity(model: ConStructModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity (B×(C·K)×h×w, rows class-major) of every prototype with the first CAM level, and logits (B×C).

    Unlike the CAMs this keeps every prototype separate and leaves out the learned scale.
    """
    out = model(images)
    refined = F.normalize(out.refined[model.cam_levels[0]].float(), dim=1)
    projected = F.normalize(model.adaptive_layer(model.prototypes()).float(), dim=-1)
    return torch.einsum("bchw,kc->bkhw", refined, projected), out.logits.float()


def prototype_names(class_names: Sequence[str], per_class: int) -> list[str]:
    """Display names of the prototype rows: 'TUM', or 'TUM #1', 'TUM #2', ... with several per class."""
    if per_class == 1:
        return list(class_names)
    return [f"{name} #{k + 1}" for name in class_names for k in range(per_class)]
