"""FG/BG contrastive refinement (L_sim) with a memory bank of negatives (method.md §6)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:  # the encoder is passed in; losses do not build models
    from construct.models.student import Student


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


def info_nce(query: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, temperature: float,
             shared_negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-positive InfoNCE per query: −log Σ_pos exp(s/τ) / Σ_all exp(s/τ).

    query N×D, positives N×P×D, negatives N×M×D (or M×D shared), shared_negatives S×D (e.g. a
    memory bank, compared with every query without being copied per query); all L2-normalised.
    """
    pos = torch.einsum("nd,npd->np", query, positives) / temperature
    if negatives.dim() == 2:
        neg = query @ negatives.t() / temperature
    else:
        neg = torch.einsum("nd,nmd->nm", query, negatives) / temperature
    parts = [pos, neg]
    if shared_negatives is not None and shared_negatives.numel():
        parts.append(query @ shared_negatives.t().to(query.dtype) / temperature)
    everything = torch.cat(parts, dim=1)
    return (torch.logsumexp(everything, dim=1) - torch.logsumexp(pos, dim=1)).mean()


SimViews = Literal["tokens", "image"]
SimGradient = Literal["encoder", "prototypes", "none"]


class FgBgContrastiveLoss(nn.Module):
    """L_sim = L_fg + L_bg over the (image, present class) pairs of a batch.

    For each pair, the soft CAM (scaled to [0, 1]) weights an FG view (soft · FG mask) and a BG
    view ((1 − soft) · BG mask) that the student embeds in its joint space:
    - L_fg: the FG embedding is pulled to its class prototype(s), pushed from the other classes'
      prototypes and from the memory bank.
    - L_bg: the BG embedding is pulled to the other classes' prototypes, pushed from its own.
    An empty view (the FG mask covers the whole tile, so nothing is left for BG, or the CAM has no
    positive peak) has nothing to embed and is left out of its term.

    How the views are embedded is configurable (method.md §6 and §9.2 for the paper's reading):
    - ``views="image"`` (the paper): the masked images go through the student's image encoder, at
      ``view_size`` px; with ``gradient="encoder"`` the gradient flows back through the encoder's
      activations into the CAM, optionally with activation checkpointing in chunks of
      ``checkpoint_chunk`` views, so that only one chunk's activations are ever held.
    - ``views="tokens"``: the tokens that the forward pass already computed are pooled by the
      student's contrastive pooling with the view's weights in its attention (CONCH: its
      attentional pooler; OpenCLIP: the last block's class-token attention; no second trunk
      pass); the gradient reaches the CAM through the pooling weights.
    - ``gradient="prototypes"``: the views are embedded without a graph, so only the prototypes
      learn from L_sim.
    - ``gradient="none"`` (the released code): the whole term is computed without a graph; it is
      a constant in the loss, so training is that of weight 0 (the bank is still filled).
    - ``max_pairs`` > 0 caps the pairs per step, drawn uniformly (the mean over the drawn pairs
      is an unbiased estimate of the mean over all).
    """

    def __init__(self, alpha: float, threshold_max: Literal["per_image", "per_class"], temperature: float,
                 bank_size: int, dim: int, views: SimViews = "image", view_size: int | None = None,
                 max_pairs: int = 0, gradient: SimGradient = "encoder", checkpoint_chunk: int = 0) -> None:
        super().__init__()
        self.alpha = alpha
        self.threshold_max = threshold_max
        self.temperature = temperature
        self.views = views
        self.view_size = view_size
        self.max_pairs = max_pairs
        self.gradient = gradient
        self.checkpoint_chunk = checkpoint_chunk
        self.bank = MemoryBank(bank_size, dim)

    def pairs(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image index, class index) of the present pairs, at most ``max_pairs`` drawn uniformly."""
        batch_idx, class_idx = labels.bool().nonzero(as_tuple=True)
        if 0 < self.max_pairs < batch_idx.numel():
            keep = torch.randperm(batch_idx.numel(), device=labels.device)[: self.max_pairs].sort().values
            batch_idx, class_idx = batch_idx[keep], class_idx[keep]
        return batch_idx, class_idx

    def view_weights(self, cams: torch.Tensor, size: tuple[int, int], batch_idx: torch.Tensor,
                     class_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FG and BG weight maps (P×1×H×W in [0, 1]) of the pairs on a ``size`` grid."""
        cams = F.interpolate(cams.float(), size=size, mode="bilinear", align_corners=False)
        fg = adaptive_fg_masks(cams, self.alpha, self.threshold_max)
        positive = cams.relu()
        soft = positive / positive.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        soft = soft[batch_idx, class_idx].unsqueeze(1)
        mask = fg[batch_idx, class_idx].unsqueeze(1).to(soft.dtype)
        if self.gradient == "prototypes":
            soft = soft.detach()
        return soft * mask, (1 - soft) * (1 - mask)

    def views_of(self, images: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image-mode FG and BG views (P×3×H×W each, at full size) and the class index of each pair."""
        batch_idx, class_idx = self.pairs(labels)
        fg, bg = self.view_weights(cams, images.shape[-2:], batch_idx, class_idx)
        pair_images = images[batch_idx]
        return fg * pair_images, bg * pair_images, class_idx

    def _encode_images(self, views: torch.Tensor, encoder: Student) -> torch.Tensor:
        if self.view_size is not None and views.shape[-1] != self.view_size:
            views = F.interpolate(views, size=(self.view_size, self.view_size), mode="bilinear", align_corners=False)
        if self.gradient == "prototypes":
            with torch.no_grad():
                return encoder.encode_image(views)
        if self.checkpoint_chunk <= 0 or not views.requires_grad:
            return encoder.encode_image(views)
        return torch.cat([checkpoint(encoder.encode_image, chunk, use_reentrant=False)
                          for chunk in views.split(self.checkpoint_chunk)])

    def embed(self, images: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor, encoder: Student,
              tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """L2-normalised FG and BG embeddings (P×D each), the class index of each pair, and which
        views are not empty (2×P booleans: FG row, BG row)."""
        if self.views == "image":
            fg_views, bg_views, class_idx = self.views_of(images, cams, labels)
            if class_idx.numel() == 0:
                return fg_views.new_zeros(0, 1), fg_views.new_zeros(0, 1), class_idx, class_idx.new_zeros(2, 0).bool()
            views = torch.cat([fg_views, bg_views])
            non_empty = views.detach().flatten(1).amax(1) > 0
            embeddings = self._encode_images(views, encoder)
        else:
            if tokens is None:
                raise ValueError("token views need the trunk tokens of the forward pass (model(..., with_tokens=True))")
            batch_idx, class_idx = self.pairs(labels)
            side = math.isqrt(tokens.shape[1] - 1)
            fg, bg = self.view_weights(cams, (side, side), batch_idx, class_idx)
            pair_tokens = tokens[batch_idx].repeat(2, 1, 1)
            weights = torch.cat([fg, bg]).flatten(1)
            non_empty = weights.detach().amax(1) > 1e-6
            if self.gradient == "prototypes":
                with torch.no_grad():
                    embeddings = encoder.encode_weighted_tokens(pair_tokens, weights)
            else:
                embeddings = encoder.encode_weighted_tokens(pair_tokens, weights)
        embeddings = F.normalize(embeddings.float(), dim=-1)
        fg_emb, bg_emb = embeddings.split(class_idx.numel())
        return fg_emb, bg_emb, class_idx, non_empty.view(2, -1)

    def forward(
        self,
        images: torch.Tensor,
        cams: torch.Tensor,
        labels: torch.Tensor,
        prototypes: torch.Tensor,
        per_class: int,
        encoder: Student,
        tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``prototypes``: (C·K)×D normalised, class-major; ``images`` in [0, 1]; ``tokens``: the
        forward pass's final trunk tokens (token views only)."""
        if self.gradient == "none":
            with torch.no_grad():
                return self._loss(images, cams, labels, prototypes, per_class, encoder, tokens)
        return self._loss(images, cams, labels, prototypes, per_class, encoder, tokens)

    def _loss(self, images: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
              per_class: int, encoder: Student, tokens: torch.Tensor | None) -> torch.Tensor:
        fg_emb, bg_emb, class_idx, non_empty = self.embed(images, cams, labels, encoder, tokens)
        fg_ok, bg_ok = non_empty
        if not non_empty.any():
            return cams.sum() * 0.0
        num_classes = prototypes.shape[0] // per_class
        grouped = prototypes.float().view(num_classes, per_class, -1)
        own = grouped[class_idx]  # P×K×D
        others_mask = torch.ones(class_idx.numel(), num_classes, dtype=torch.bool, device=class_idx.device)
        others_mask[torch.arange(class_idx.numel()), class_idx] = False
        others = grouped.unsqueeze(0).expand(class_idx.numel(), -1, -1, -1)[others_mask].view(class_idx.numel(), -1, grouped.shape[-1])
        terms = []
        if fg_ok.any():
            # a copy of the bank: the push below updates it in place, and the backward pass needs these values
            terms.append(info_nce(fg_emb[fg_ok], own[fg_ok], others[fg_ok], self.temperature,
                                  shared_negatives=self.bank.features.clone()))
        if bg_ok.any():
            terms.append(info_nce(bg_emb[bg_ok], others[bg_ok], own[bg_ok], self.temperature))
        if self.training:
            self.bank.push(bg_emb[bg_ok])
        return sum(terms)
