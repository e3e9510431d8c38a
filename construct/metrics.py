"""Segmentation metrics from a streaming confusion matrix (method.md §8).

Rows are ground truth, columns prediction. IoU_c = TP/(GT_c + Pred_c − TP) and
Dice_c = 2·TP/(GT_c + Pred_c). mIoU and mDice average the tissue classes only. Background (the
last class) is handled by one of two conventions that papers use:

- ``counted`` (TPRO, PBIP, ConStruct): background is a class of the (C+1)×(C+1) matrix and counts in
  FwIoU and pixel accuracy, but not in the means;
- ``ignored`` (WSSS-Tissue): ground-truth background pixels are left out entirely (a tissue pixel
  predicted as background still counts as an error); background's own IoU is then undefined.

A class absent from both ground truth and prediction has no defined IoU or Dice: it is NaN,
left out of the means (nan-mean), and written as null in JSON. All values are percentages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

BACKGROUND_CONVENTIONS: tuple[str, ...] = ("counted", "ignored")


@dataclass(frozen=True)
class SegmentationMetrics:
    """Per-class and summary metrics, in percent (NaN where undefined)."""

    class_names: tuple[str, ...]
    background: str
    """Background convention: 'counted' or 'ignored' (see the module docstring)."""
    iou: tuple[float, ...]
    dice: tuple[float, ...]
    miou: float
    mdice: float
    fwiou: float
    pixel_accuracy: float
    confusion: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict:
        """A JSON-able dict; NaN becomes None (null)."""

        def clean(v: float) -> float | None:
            return None if math.isnan(v) else float(v)

        return {
            "background": self.background,
            "miou": clean(self.miou),
            "mdice": clean(self.mdice),
            "fwiou": clean(self.fwiou),
            "pixel_accuracy": clean(self.pixel_accuracy),
            "per_class": {
                name: {"iou": clean(i), "dice": clean(d)}
                for name, i, d in zip(self.class_names, self.iou, self.dice)
            },
            "confusion_matrix": [list(row) for row in self.confusion],
        }

    def format_table(self) -> str:
        """A printable per-class table (IoU, Dice) followed by the summary numbers."""

        def fmt(v: float) -> str:
            return f"{'n/a':>7}" if math.isnan(v) else f"{v:7.2f}"

        width = max(len(n) for n in self.class_names + ("class",))
        lines = [f"{'class':<{width}}     IoU    Dice"]
        lines += [f"{n:<{width}} {fmt(i)} {fmt(d)}" for n, i, d in zip(self.class_names, self.iou, self.dice)]
        tissue = "/".join(self.class_names[:-1])
        lines.append(f"mIoU  {fmt(self.miou)}   mDice {fmt(self.mdice)}   (mean over {tissue})")
        lines.append(f"FwIoU {fmt(self.fwiou)}   PixAcc{fmt(self.pixel_accuracy)}   (background {self.background}: "
                     + ("ground-truth background pixels left out)" if self.background == "ignored"
                        else "a class of the matrix, not of the means)"))
        return "\n".join(lines)


class ConfusionMatrix:
    """Streaming num_classes×num_classes confusion matrix (rows GT, columns prediction).

    The matrix lives on ``device``; with ``device=None`` it is created on the device of the
    first ``update``, so CUDA predictions are counted without a copy to the CPU. ``class_names``
    are the tissue classes then background (the last class): it is excluded from mIoU/mDice.
    """

    def __init__(self, class_names: tuple[str, ...] | list[str], device: torch.device | str | None = None) -> None:
        num_classes = len(class_names)
        if num_classes < 2:
            raise ValueError(f"need at least 2 classes (tissue + background), got {num_classes}")
        self.num_classes = num_classes
        self.class_names = tuple(class_names)
        self.matrix: torch.Tensor | None = None
        if device is not None:
            self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def _ensure(self, device: torch.device) -> torch.Tensor:
        if self.matrix is None:
            self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)
        return self.matrix

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count pixels of integer class maps ``pred`` and ``target`` (same shape, any batch)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("pred and target must be integer class indices (argmax first)")
        matrix = self._ensure(pred.device)
        pred = pred.reshape(-1).to(matrix.device, torch.int64)
        target = target.reshape(-1).to(matrix.device, torch.int64)
        n = self.num_classes
        if pred.numel() and (min(pred.min(), target.min()) < 0 or max(pred.max(), target.max()) >= n):
            raise ValueError(f"class indices must be in 0..{n - 1}")
        matrix += torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add the counts of another matrix with the same number of classes."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        if other.matrix is not None:
            matrix = self._ensure(other.matrix.device)
            matrix += other.matrix.to(matrix.device)

    def reset(self) -> None:
        """Zero the counts (the device is kept)."""
        if self.matrix is not None:
            self.matrix.zero_()

    def compute(self, background: str = "counted") -> SegmentationMetrics:
        """Metrics of everything counted so far under a background convention (all NaN if nothing was counted)."""
        if background not in BACKGROUND_CONVENTIONS:
            raise ValueError(f"unknown background convention {background!r}; expected one of {BACKGROUND_CONVENTIONS}")
        n = self.num_classes
        counts = np.zeros((n, n), np.int64) if self.matrix is None else self.matrix.cpu().numpy()
        if background == "ignored":
            counts = counts.copy()
            counts[-1] = 0  # the ground-truth background row
        cm = counts.astype(np.float64)
        tp, gt, pred = np.diag(cm), cm.sum(1), cm.sum(0)
        total = cm.sum()
        with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 → NaN is the intent
            iou = 100.0 * tp / (gt + pred - tp)
            dice = 100.0 * 2.0 * tp / (gt + pred)
            if background == "ignored":
                iou[-1] = dice[-1] = math.nan
            # Absent classes have weight 0; nansum keeps their NaN IoU from poisoning the sum.
            fwiou = float(np.nansum(gt / total * iou)) if total else math.nan
            accuracy = 100.0 * float(tp.sum() / total) if total else math.nan
        return SegmentationMetrics(
            class_names=self.class_names,
            background=background,
            iou=tuple(float(v) for v in iou),
            dice=tuple(float(v) for v in dice),
            miou=_nanmean(iou[:-1]),
            mdice=_nanmean(dice[:-1]),
            fwiou=fwiou,
            pixel_accuracy=accuracy,
            confusion=tuple(tuple(int(v) for v in row) for row in counts),
        )


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN values; NaN (without numpy's warning) when there are none."""
    valid = values[~np.isnan(values)]
    return float(valid.mean()) if valid.size else math.nan
