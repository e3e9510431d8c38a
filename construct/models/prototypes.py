"""Text-initialised class prototypes and the adaptive layer that maps them to visual space."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class PrototypeBank(nn.Module):
    """K learnable prototypes per class in the student's 512-d joint embedding space.

    Each prototype starts at its class's L2-normalised text embedding (method.md §5). Because
    they live in the joint space, the FG/BG contrastive loss compares them directly with the student's
    image embeddings, while :class:`AdaptiveLayer` projects them onto the refined patch features.
    """

    def __init__(self, text_embeddings: torch.Tensor, per_class: int) -> None:
        super().__init__()
        self.num_classes, self.dim = text_embeddings.shape
        self.per_class = per_class
        init = F.normalize(text_embeddings.detach().float(), dim=-1)
        # Row order: class-major (c0k0, c0k1, ..., c1k0, ...), which reduce_per_class relies on.
        self.prototypes = nn.Parameter(init.repeat_interleave(per_class, dim=0).clone())

    def forward(self) -> torch.Tensor:
        """All prototypes, (num_classes * per_class) x dim, L2-normalised."""
        return F.normalize(self.prototypes, dim=-1)

    def reduce_per_class(self, scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Max over each class's K prototypes along ``dim`` (size num_classes * K → num_classes)."""
        shape = list(scores.shape)
        shape[dim : dim + 1] = [self.num_classes, self.per_class]
        return scores.reshape(shape).amax(dim=dim + 1)


class AdaptiveLayer(nn.Sequential):
    """Two-layer MLP (512 → ratio·512 → visual width, ReLU) shared by all prototypes.

    ``init="trunc_normal"`` draws the weights from a truncated normal (std 0.02) with zero biases,
    as the released code does; ``"default"`` keeps PyTorch's Linear initialisation.
    """

    def __init__(self, in_dim: int, out_dim: int, ratio: float, init: Literal["default", "trunc_normal"] = "default") -> None:
        hidden = max(1, round(in_dim * ratio))
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
        if init == "trunc_normal":
            for layer in (self[0], self[2]):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
