"""Training augmentation (method.md §1): flips and 90° rotations, nothing else.

Random draws use torch's global RNG, which DataLoader seeds differently in every worker, so
workers do not repeat each other's augmentations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _coin(p: float) -> bool:
    return bool(torch.rand(()) < p)


def flip_rotate(
    image: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Randomly flip and rotate a C×H×W image and, identically, an optional H×W mask.

    Horizontal flip p=0.5, vertical flip p=0.5, then with p=0.5 a rotation by k·90° with
    k uniform in {1, 2, 3}.
    """
    # Each op acts on the last two dims, so the same call serves image (C×H×W) and mask (H×W).
    ops: list[Callable[[torch.Tensor], torch.Tensor]] = []
    if _coin(0.5):
        ops.append(lambda t: t.flip(-1))
    if _coin(0.5):
        ops.append(lambda t: t.flip(-2))
    if _coin(0.5):
        k = int(torch.randint(1, 4, ()))
        ops.append(lambda t: t.rot90(k, dims=(-2, -1)))
    for op in ops:
        image = op(image)
        mask = op(mask) if mask is not None else None
    return image, mask
