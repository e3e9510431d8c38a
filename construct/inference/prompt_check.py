"""Zero-shot check of the class prompts: does the student (CONCH) embed each class's regions nearest its own prompt?

L_sim (method.md §6) pulls each class's CAM towards the foreground views that CONCH embeds near
the class's text prompt. Where CONCH's zero-shot view of a class is wrong, that pull points the
wrong way; on the testbed it cost a class its IoU and the full loss ~12 points of test mIoU
(docs/ablation.md, 3.3). This check measures it on labelled data before any training.

Each view is one class region of one val tile, taken as L_sim takes its views but with the true
mask in place of the CAM. ``image`` (the default of the check) encodes the tile with the other
pixels blacked out: what CONCH makes of that tissue alone, the zero-shot accuracy the testbed's
ablation relates to L_sim's gain or loss. ``tokens`` pools the tile's last-block tokens with the
region's share of each token as attention weights (``loss.sim_views: tokens``); those tokens have
attended to the whole tile, so a small region's view leans towards its neighbours and scores
lower. A view counts as understood when its embedding is closest to its own class's prompt among
the class prompts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from construct.models.student import Student

WARN_BELOW = 0.7
"""Default per-class zero-shot accuracy below which a class is reported as poorly understood. A
heuristic set between the testbed's two regimes (docs/datasets.md): in style, where L_sim pays off
over a long run, every class scores 77-100 %; on the painter the towers never saw, where L_sim
costs ~12 points, three of four classes score 21-47 %."""


@dataclass
class PromptCheck:
    names: tuple[str, ...]
    confusion: np.ndarray
    """C×C counts of class-region views: row = true class, column = the class whose prompt is nearest."""
    views: str
    images: int

    @property
    def regions(self) -> np.ndarray:
        return self.confusion.sum(axis=1)

    @property
    def accuracy(self) -> np.ndarray:
        """Per-class share of regions nearest their own prompt (NaN for a class without regions)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.diag(self.confusion) / self.regions

    @property
    def overall(self) -> float:
        return float(np.trace(self.confusion) / max(int(self.confusion.sum()), 1))

    def poorly_understood(self, warn_below: float = WARN_BELOW) -> list[int]:
        """Classes with regions whose accuracy is below ``warn_below``."""
        return [c for c, acc in enumerate(self.accuracy) if self.regions[c] and acc < warn_below]

    def format(self, warn_below: float = WARN_BELOW) -> str:
        """Per-class table (regions, zero-shot accuracy, the confusion row), the mean, then the warnings."""
        width = max(5, *(len(n) + 1 for n in self.names))
        lines = [f"{'class':<{width}} {'regions':>7} {'zero-shot':>9}  | nearest prompt:",
                 f"{'':<{width}} {'':>7} {'':>9}  | " + " ".join(f"{n:>{width}}" for n in self.names)]
        for c, name in enumerate(self.names):
            acc = "-" if not self.regions[c] else f"{100 * self.accuracy[c]:.1f}%"
            row = " ".join(f"{int(v):>{width}}" for v in self.confusion[c])
            lines.append(f"{name:<{width}} {int(self.regions[c]):>7} {acc:>9}  | {row}")
        lines.append(f"all classes: {100 * self.overall:.1f}% of {int(self.confusion.sum())} regions "
                     f"(chance {100 / len(self.names):.1f}%)")
        poor = self.poorly_understood(warn_below)
        for c in poor:
            wrong = self.confusion[c].copy()
            wrong[c] = 0
            lines.append(f"warning: {self.names[c]}: {100 * self.accuracy[c]:.1f}% of its regions lie nearest its own "
                         f"prompt, below {100 * warn_below:.0f}% (the others mostly nearest "
                         f"{self.names[int(wrong.argmax())]}'s)")
        if poor:
            lines.append(
                "  L_sim pulls each class's CAM towards what CONCH embeds near the class's prompt; where CONCH's view "
                "of a class is wrong it pulls the wrong way (docs/ablation.md 3.3: ~12 points of test mIoU on the "
                "testbed). Rewrite those prompts (data.classes[].prompt) and check again, or lower loss.sim_weight "
                "(0 turns L_sim off).")
        return "\n".join(lines)


@torch.no_grad()
def class_region_embeddings(student: Student, images: torch.Tensor, masks: torch.Tensor, num_classes: int,
                            min_share: float, views: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (P×512) and true classes (P) of the class regions of a batch.

    ``images``: B×3×S×S in [0, 1] at the model's tile size; ``masks``: B×S×S internal class indices
    (background = ``num_classes``, not a view). A region is a class covering at least ``min_share``
    of its tile.
    """
    onehot = F.one_hot(masks.long(), num_classes + 1)[..., :num_classes].permute(0, 3, 1, 2).float()  # B×C×S×S
    shares = onehot.mean(dim=(2, 3))
    batch_idx, class_idx = torch.nonzero(shares >= min_share, as_tuple=True)
    if batch_idx.numel() == 0:
        return torch.zeros(0, student.embed_dim), class_idx
    if views == "image":
        regions = images[batch_idx] * onehot[batch_idx, class_idx][:, None]
        return student.encode_image(regions), class_idx
    _, tokens = student.block_features_and_tokens(images, [0])  # the final tokens, whichever blocks are asked for
    grid = int(round((tokens.shape[1] - 1) ** 0.5))
    weights = F.adaptive_avg_pool2d(onehot, grid).flatten(2)  # B×C×N: the region's share of each token
    return student.encode_weighted_tokens(tokens[batch_idx], weights[batch_idx, class_idx]), class_idx


@torch.no_grad()
def check_prompts(student: Student, prompts: Sequence[str], names: Sequence[str],
                  batches: Iterable[tuple[torch.Tensor, torch.Tensor]], min_share: float = 0.1,
                  views: str = "image") -> PromptCheck:
    """Zero-shot confusion of the class-region views of ``batches`` ((images, masks) at the tile size)."""
    device = next(iter(student.parameters())).device
    text = student.encode_text(student.tokenize(list(prompts)).to(device))
    count = len(names)
    confusion = np.zeros((count, count), np.int64)
    images_seen = 0
    for images, masks in batches:
        embeddings, truth = class_region_embeddings(student, images.to(device), masks.to(device), count, min_share, views)
        nearest = (embeddings @ text.t()).argmax(dim=1) if len(truth) else truth
        np.add.at(confusion, (truth.cpu().numpy(), nearest.cpu().numpy()), 1)
        images_seen += len(images)
    return PromptCheck(names=tuple(names), confusion=confusion, views=views, images=images_seen)
