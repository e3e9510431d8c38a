"""Stage-2 prediction: the segmenter's class probabilities → optional dense CRF → argmax.

:class:`SegmenterPredictor` has the interface of :class:`~construct.inference.predictor.Predictor`,
so evaluation, export, regions and whole slides run either stage. The segmenter predicts every
class and background itself: there is no class presence to gate with (the presence protocol does
not apply), no background channel and no CAM. Flip TTA and the CRF are off unless
``stage2.tta_flip`` / ``stage2.crf`` turn them on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from construct.classes import ClassSet
from construct.config import Config
from construct.inference.crf import CrfPool
from construct.inference.postprocess import apply_background_prior
from construct.inference.predictor import Prediction, Predictor, inference_autocast, to_uint8_images
from construct.inference.tiling import forward_any_size, window_stride
from construct.models.construct import ConStructModel
from construct.models.segmenter import Segmenter

NO_GATING = "none"
"""The presence protocol of stage-2 predictions: nothing gates them."""


@dataclass(frozen=True)
class FlipTta:
    """Stage 2's test-time augmentation: the plain pass, or its mean with the mirrored pass."""

    flip: bool = False

    @property
    def mode(self) -> str:
        return "flip" if self.flip else "off"

    @property
    def forward_passes(self) -> int:
        return 2 if self.flip else 1

    def record(self) -> dict[str, Any]:
        """What output files store about the augmentation (JSON-ready, as stage 1's)."""
        return {"mode": self.mode, "factors": [1.0], "flip": self.flip, "forward_passes": self.forward_passes}

    def describe(self) -> str:
        return "TTA flip (2 passes)" if self.flip else "TTA off"


class SegmenterPredictor:
    """Turns [0, 1] image batches into masks with a stage-2 segmenter.

    Images of any size run as stage 1's do (one batch for tile-sized ones, a sliding window otherwise).
    ``tta`` allows ``stage2.tta_flip`` and ``crf`` allows ``stage2.crf`` (``inference.crf``'s
    kernels over ``workers`` processes); the dataset's background prior applies as in stage 1.
    """

    def __init__(self, model: Segmenter, config: Config, device: torch.device, tta: bool = True, crf: bool = True,
                 workers: int | None = None) -> None:
        self.model = model.to(device).eval()
        self.config = config
        self.device = device
        self.inference = config.inference
        self.classes = ClassSet.from_config(config)
        self.background_prior = config.data.background_prior
        self.tta = FlipTta(flip=tta and config.stage2.tta_flip)
        self.crf = CrfPool(self.inference.crf, workers) if crf and config.stage2.crf else None

    @property
    def uses_crf(self) -> bool:
        return self.crf is not None

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B×(C+1)×h×w softmax probabilities on the output grid, B×C highest probability of each class)."""
        probs = self.model(images).float().softmax(dim=1)
        if self.tta.flip:
            probs = (probs + self.model(images.flip(-1)).float().softmax(dim=1).flip(-1)) / 2
        return probs, probs[:, :-1].amax(dim=(2, 3))

    @torch.no_grad()
    def network(self, images: torch.Tensor, names: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities (B×(C+1)×h×w: the output grid for tile-sized images, pixels for others;
        stage 1's sizing rules) and each class's highest probability (B×C)."""
        images = images.to(self.device, non_blocking=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                            enabled=inference_autocast(self.device, self.inference)):
            return forward_any_size(self._forward, images, self.config.model.image_size, window_stride(self.config),
                                    self.inference.batch_size, names)

    @torch.no_grad()
    def postprocess(self, images: torch.Tensor, probs: torch.Tensor, scores: torch.Tensor, protocol: str = NO_GATING,
                    presence_gt: torch.Tensor | None = None) -> list[Prediction]:
        """Upsample :meth:`network` output to the images, refine with the CRF (if on), argmax, then the
        dataset's background prior (if any). ``protocol`` and ``presence_gt`` are accepted for the
        interface of stage 1 and ignored: nothing is gated."""
        probs = F.interpolate(probs.float(), size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
        probs_np = list(probs.cpu().numpy())
        pixels = to_uint8_images(images) if self.crf is not None or self.background_prior is not None else []
        if self.crf is None:
            masks = [p.argmax(axis=0).astype(np.uint8) for p in probs_np]
        else:
            masks = self.crf(pixels, probs_np)
        if self.background_prior is not None:
            prior = self.background_prior
            masks = [apply_background_prior(m, px, prior.grey_threshold, prior.min_size, self.classes.background)
                     for m, px in zip(masks, pixels)]
        count = self.classes.num_classes
        presence = [(np.bincount(m.ravel(), minlength=count + 1)[:count] > 0).astype(np.float32) for m in masks]
        return [Prediction(mask=m, probs=p, presence=pr, scores=s, protocol=NO_GATING)
                for m, p, pr, s in zip(masks, probs_np, presence, scores.float().cpu().numpy())]

    def predict_batch(self, images: torch.Tensor, presence_gt: torch.Tensor | None = None,
                      protocol: str | None = None, names: Sequence[str] | None = None) -> list[Prediction]:
        """Masks for a B×3×H×W [0, 1] batch (``presence_gt`` and ``protocol`` do not apply)."""
        probs, scores = self.network(images, names)
        return self.postprocess(images, probs, scores)

    @torch.no_grad()
    def tile_maps(self, images: torch.Tensor) -> torch.Tensor:
        """B×(C+1)×h×w class probabilities, which the streaming path averages where tiles overlap."""
        return self.network(images)[0]

    def window_probabilities(self, maps: torch.Tensor) -> torch.Tensor:
        """Averaged :meth:`tile_maps` are already the (C+1)×h×w probabilities."""
        return maps

    def close(self) -> None:
        if self.crf is not None:
            self.crf.close()

    def __enter__(self) -> SegmenterPredictor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def predictor_for(model: ConStructModel | Segmenter, config: Config, device: torch.device, tta: bool = True,
                  crf: bool = True, workers: int | None = None) -> Predictor | SegmenterPredictor:
    """The predictor of either stage's network. ``tta`` / ``crf`` allow what the config turns on: stage 1's
    inference.tta and inference.crf.enabled, stage 2's stage2.tta_flip and stage2.crf."""
    if isinstance(model, Segmenter):
        return SegmenterPredictor(model, config, device, tta=tta, crf=crf, workers=workers)
    return Predictor(model, config, device, tta=tta, crf=crf and config.inference.crf.enabled, workers=workers)
