"""FG/BG contrastive refinement (L_sim) with a memory bank of negatives (method.md §6)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class MemoryBank(nn.Module):
    """FIFO queue of L2-normalised embeddings used as extra negatives.

    Kept as buffers so checkpoints carry it and a resumed run sees the same negatives.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("queue", torch.zeros(size, dim))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @property
    def features(self) -> torch.Tensor:
        """The filled part of the queue (count × dim)."""
        return self.queue[: int(self.count)]

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor) -> None:
        """Append embeddings (detached), overwriting the oldest once full."""
        if self.size == 0 or embeddings.numel() == 0:
            return
        embeddings = F.normalize(embeddings.detach().float(), dim=-1)[-self.size :]
        n = embeddings.shape[0]
        index = (int(self.pointer) + torch.arange(n, device=self.queue.device)) % self.size
        self.queue[index] = embeddings.to(self.queue.device)
        self.pointer.fill_((int(self.pointer) + n) % self.size)
        self.count.fill_(min(self.size, int(self.count) + n))


def adaptive_fg_masks(cams: torch.Tensor, alpha: float, threshold_max: Literal["per_image", "per_class"]) -> torch.Tensor:
    """Boolean FG masks: ReLU(CAM) ≥ alpha · max, the max taken per image or per class."""
    cams = cams.detach().relu()
    if threshold_max == "per_image":
        peak = cams.amax(dim=(1, 2, 3), keepdim=True)
    else:
        peak = cams.amax(dim=(2, 3), keepdim=True)
    return (cams >= alpha * peak) & (peak > 0)


def info_nce(query: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Multi-positive InfoNCE per query: −log Σ_pos exp(s/τ) / Σ_all exp(s/τ).

    query N×D, positives N×P×D, negatives N×M×D (or M×D shared); all L2-normalised.
    """
    pos = torch.einsum("nd,npd->np", query, positives) / temperature
    if negatives.dim() == 2:
        neg = query @ negatives.t() / temperature
    else:
        neg = torch.einsum("nd,nmd->nm", query, negatives) / temperature
    everything = torch.cat([pos, neg], dim=1)
    return (torch.logsumexp(everything, dim=1) - torch.logsumexp(pos, dim=1)).mean()


class FgBgContrastiveLoss(nn.Module):
    """L_sim = L_fg + L_bg over every (image, present class) pair.

    For each pair, the soft CAM (scaled to [0, 1]) cuts an FG view (soft·image·FG mask) and a BG
    view ((1 − soft)·image·BG mask) out of the image; the frozen CONCH image encoder embeds both
    with gradients flowing through its activations back into the CAM, so the adapters and
    prototypes learn from this loss (method.md §9.2).
    - L_fg: the FG embedding is pulled to its class prototype(s), pushed from the other classes'
      prototypes and from the memory bank.
    - L_bg: the BG embedding is pulled to the other classes' prototypes, pushed from its own.
    """

    def __init__(self, alpha: float, threshold_max: Literal["per_image", "per_class"], temperature: float,
                 bank_size: int, dim: int) -> None:
        super().__init__()
        self.alpha = alpha
        self.threshold_max = threshold_max
        self.temperature = temperature
        self.bank = MemoryBank(bank_size, dim)

    def views(self, images: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FG and BG views (P×3×H×W each) and the class index of each of the P present pairs."""
        cams = F.interpolate(cams.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        fg = adaptive_fg_masks(cams, self.alpha, self.threshold_max)
        positive = cams.relu()
        soft = positive / positive.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        batch_idx, class_idx = labels.bool().nonzero(as_tuple=True)
        soft = soft[batch_idx, class_idx].unsqueeze(1)
        mask = fg[batch_idx, class_idx].unsqueeze(1).to(soft.dtype)
        pair_images = images[batch_idx]
        return soft * pair_images * mask, (1 - soft) * pair_images * (1 - mask), class_idx

    def forward(
        self,
        images: torch.Tensor,
        cams: torch.Tensor,
        labels: torch.Tensor,
        prototypes: torch.Tensor,
        per_class: int,
        encode_image: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``prototypes``: (C·K)×D normalised, class-major; ``encode_image``: [0,1] images → N×D."""
        fg_views, bg_views, class_idx = self.views(images, cams, labels)
        if class_idx.numel() == 0:
            return cams.sum() * 0.0
        embeddings = F.normalize(encode_image(torch.cat([fg_views, bg_views])).float(), dim=-1)
        fg_emb, bg_emb = embeddings.split(class_idx.numel())
        num_classes = prototypes.shape[0] // per_class
        grouped = prototypes.float().view(num_classes, per_class, -1)
        own = grouped[class_idx]  # P×K×D
        others_mask = torch.ones(class_idx.numel(), num_classes, dtype=torch.bool, device=class_idx.device)
        others_mask[torch.arange(class_idx.numel()), class_idx] = False
        others = grouped.unsqueeze(0).expand(class_idx.numel(), -1, -1, -1)[others_mask].view(class_idx.numel(), -1, grouped.shape[-1])
        fg_negatives = torch.cat([others, self.bank.features.unsqueeze(0).expand(class_idx.numel(), -1, -1)], dim=1)
        loss_fg = info_nce(fg_emb, own, fg_negatives, self.temperature)
        loss_bg = info_nce(bg_emb, others, own, self.temperature)
        if self.training:
            self.bank.push(bg_emb)
        return loss_fg + loss_bg
