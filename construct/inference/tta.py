"""Test-time augmentation (method.md §7): horizontal flips × intensity factors or input scales.

``intensity`` is what the authors' code runs and what made the paper's numbers: every pass sees the
tile at its own size, the student's normalised input multiplied by a factor (the ``ttach`` ``Multiply``
transform on an already-normalised tensor), optionally mirrored. ``resize`` is multi-scale TTA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from construct.config import InferenceConfig
from construct.errors import ConfigError
from construct.inference.postprocess import normalize_cams
from construct.models.conch import PATCH_SIZE
from construct.models.construct import ConStructModel

TtaMode = Literal["off", "intensity", "resize"]


def scaled_size(size: int, scale: float) -> int:
    """``size · scale`` rounded to the nearest multiple of the patch size (at least one patch)."""
    return max(PATCH_SIZE, round(size * scale / PATCH_SIZE) * PATCH_SIZE)


def _flips(flip: bool) -> tuple[bool, ...]:
    return (False, True) if flip else (False,)


def _pass_cams(cams: torch.Tensor, mirrored: bool, normalize_each: bool) -> torch.Tensor:
    cams = normalize_cams(cams) if normalize_each else cams.float()
    return cams.flip(-1) if mirrored else cams


def intensity_tta(model: ConStructModel, images: torch.Tensor, factors: Sequence[float],
                  flip: bool, normalize_each: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CAMs over flips × intensity factors (B×C×h×w) and the logits of the plain pass (B×C).

    Each pass multiplies the student's normalised input by a factor, at the input's size; mirrored passes
    are mirrored back before averaging. As in the authors' code, the image-level logits come from
    one plain pass, not from the augmented ones. When 1.0 is a factor, the unflipped ×1.0 pass *is*
    that plain pass (the same input, bit for bit), so its logits are taken instead of running it twice.
    ``normalize_each``: every pass's CAMs are ReLU'd and min-max scaled before averaging (the released code).
    """
    cams_sum = plain_logits = None
    for factor in factors:
        for mirrored in _flips(flip):
            out = model(images.flip(-1) if mirrored else images, intensity=factor)
            cams = _pass_cams(out.cams, mirrored, normalize_each)
            cams_sum = cams if cams_sum is None else cams_sum + cams
            if factor == 1.0 and not mirrored:
                plain_logits = out.logits.float()
    if plain_logits is None:
        plain_logits = model(images).logits.float()
    return cams_sum / (len(factors) * len(_flips(flip))), plain_logits


def resize_tta(model: ConStructModel, images: torch.Tensor, scales: Sequence[float],
               flip: bool, normalize_each: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CAMs (B×C×h×w, on the CAM grid of the unscaled input) and mean logits (B×C) over flips × scales.

    Each pass resizes the input bilinearly (scale ≠ 1), optionally mirrors it, and its CAMs are
    mirrored back and resized to the scale-1.0 grid. ``scales=[1.0], flip=False`` is one plain pass.
    """
    if 1.0 not in scales:
        raise ConfigError(f"inference.tta_factors {list(scales)} must include 1.0 for resize TTA: CAMs are averaged on its grid")
    height, width = images.shape[-2:]
    cams_sum = logits_sum = None
    passes = 0
    # The unscaled pass goes first: its CAM grid is where every pass is averaged.
    for scale in sorted(scales, key=lambda s: s != 1.0):
        size = (scaled_size(height, scale), scaled_size(width, scale))
        scaled = images if scale == 1.0 else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for mirrored in _flips(flip):
            out = model(scaled.flip(-1) if mirrored else scaled)
            cams = _pass_cams(out.cams, mirrored, normalize_each)
            if cams_sum is None:
                cams_sum, logits_sum = cams, out.logits.float()
            else:
                if cams.shape[-2:] != cams_sum.shape[-2:]:
                    cams = F.interpolate(cams, size=cams_sum.shape[-2:], mode="bilinear", align_corners=False)
                cams_sum, logits_sum = cams_sum + cams, logits_sum + out.logits.float()
            passes += 1
    return cams_sum / passes, logits_sum / passes


@dataclass(frozen=True)
class TtaSettings:
    """The augmentation a predictor runs on each tile; ``mode='off'`` is one plain pass.

    ``normalize_each``: each pass's CAMs are scaled to [0, 1] before averaging, and what
    :meth:`forward` returns is already in [0, 1] (``inference.cam_normalization: per_pass``).
    """

    mode: TtaMode
    factors: tuple[float, ...] = (1.0,)
    flip: bool = False
    normalize_each: bool = False

    @classmethod
    def from_config(cls, inference: InferenceConfig, enabled: bool = True) -> TtaSettings:
        """``inference``'s augmentation, or one plain pass when not ``enabled`` (same CAM scaling)."""
        per_pass = inference.cam_normalization == "per_pass"
        if not enabled:
            return cls("off", normalize_each=per_pass)
        return cls(inference.tta, tuple(inference.tta_factors), inference.tta_flip, per_pass)

    @property
    def forward_passes(self) -> int:
        """Network passes per tile (intensity's plain pass costs one only when 1.0 is not a factor)."""
        if self.mode == "off":
            return 1
        augmented = len(self.factors) * len(_flips(self.flip))
        return augmented + int(self.mode == "intensity" and 1.0 not in self.factors)

    def record(self) -> dict[str, Any]:
        """What output files store about the augmentation (JSON-ready)."""
        return {"mode": self.mode, "factors": list(self.factors), "flip": self.flip, "forward_passes": self.forward_passes}

    def describe(self) -> str:
        """One line for printed summaries, e.g. ``TTA intensity ×[0.9, 1.0, 1.1] + flip (6 passes)``."""
        if self.mode == "off":
            return "TTA off"
        passes = self.forward_passes
        return f"TTA {self.mode} ×{list(self.factors)}{' + flip' if self.flip else ''} ({passes} pass{'es' * (passes != 1)})"

    def forward(self, model: ConStructModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CAMs (B×C×h×w, the CAM grid of ``images``) and logits (B×C), as float32."""
        if self.mode == "intensity":
            return intensity_tta(model, images, self.factors, self.flip, self.normalize_each)
        if self.mode == "resize":
            return resize_tta(model, images, self.factors, self.flip, self.normalize_each)
        out = model(images)
        return _pass_cams(out.cams, False, self.normalize_each), out.logits.float()
