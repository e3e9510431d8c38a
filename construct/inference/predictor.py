"""CAM → mask prediction (method.md §7): network (TTA, tiling) → gated probabilities → dense CRF → argmax."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from construct.classes import ClassSet
from construct.config import Config, InferenceConfig
from construct.inference.crf import CrfPool
from construct.inference.postprocess import (
    apply_background_prior,
    cam_probabilities,
    normalize_cams,
    presence_from_logits,
    select_presence,
)
from construct.inference.tiling import forward_any_size, window_stride
from construct.inference.tta import TtaSettings
from construct.models.construct import ConStructModel
from construct.models.graphs import enable_fast_path


@dataclass
class Prediction:
    """Post-processed result for one image."""

    mask: np.ndarray
    """H×W uint8 internal class indices 0..C (C = background)."""
    probs: np.ndarray
    """(C+1)×H×W float32: normalised, presence-gated CAMs of the C classes, then the background channel."""
    presence: np.ndarray
    """(C,) float 0/1 class presence the CAMs were gated with."""
    scores: np.ndarray
    """(C,) image-level class scores, sigmoid of the logits."""
    protocol: str
    """Presence protocol that produced ``presence``: 'predicted' or 'ground_truth'."""

    @property
    def cams(self) -> np.ndarray:
        """C×H×W normalised, gated class CAMs in [0, 1]."""
        return self.probs[:-1]


def inference_autocast(device: torch.device, inference: InferenceConfig) -> bool:
    """Whether inference runs under bf16 autocast: on CUDA unless ``inference.mixed_precision`` is off."""
    return device.type == "cuda" and inference.mixed_precision


def to_uint8_images(images: torch.Tensor) -> list[np.ndarray]:
    """B×3×H×W [0, 1] tensor → H×W×3 uint8 arrays (what the CRF's bilateral kernel compares)."""
    pixels = (images.detach().float().cpu() * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return list(pixels.permute(0, 2, 3, 1).numpy())


def denormalized_uint8_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> list[np.ndarray]:
    """The released code's CRF image: the uint8 tile normalised as its loader does ((v − 255·mean) ·
    1/(255·std), float32), de-normalised, scaled by 255 and truncated (not rounded) to uint8."""
    values = (images.detach().float().cpu() * 255.0).round_()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    normalised = (values - mean_t * 255.0) * (1.0 / (std_t * 255.0))
    pixels = ((normalised * std_t + mean_t) * 255.0).clamp_(0, 255).to(torch.uint8)
    return list(pixels.permute(0, 2, 3, 1).numpy())


class Predictor:
    """Turns [0, 1] image batches into masks with the inference settings of ``config``.

    Tile-sized images run as one batch; others through :func:`forward_any_size` (a sliding window,
    after upsampling an image smaller than the tile), so each is predicted at its own size. ``tta`` runs
    ``inference.tta`` over ``inference.tta_factors`` × ``inference.tta_flip`` on every tile (off = one
    plain pass; :attr:`tta` says which ran); ``crf`` runs the dense CRF of
    ``inference.crf`` over ``workers`` processes (None = all cores). ``inference.fast_path`` on a
    CUDA device replays the student's frozen forward as CUDA graphs with bf16 weights (one per TTA pass
    shape; this changes ``model.student`` for good). Close it (or use ``with``) to stop the CRF workers.
    """

    def __init__(self, model: ConStructModel, config: Config, device: torch.device, tta: bool = True,
                 crf: bool = True, workers: int | None = None) -> None:
        self.model = model.to(device).eval()
        if config.inference.fast_path and device.type == "cuda":
            enable_fast_path(self.model.student)
        self.config = config
        self.device = device
        self.inference = config.inference
        self.classes = ClassSet.from_config(config)
        self.background_prior = config.data.background_prior
        self.tta = TtaSettings.from_config(self.inference, enabled=tta)
        self.crf = CrfPool(self.inference.crf, workers) if crf else None

    @property
    def uses_crf(self) -> bool:
        return self.crf is not None

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tta.forward(self.model, images)

    @torch.no_grad()
    def network(self, images: torch.Tensor, names: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw CAMs (B×C×h×w: the CAM grid for tile-sized images, pixels for others) and logits (B×C) of a
        batch of same-size images."""
        images = images.to(self.device, non_blocking=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                            enabled=inference_autocast(self.device, self.inference)):
            return forward_any_size(self._forward, images, self.config.model.image_size, window_stride(self.config),
                                    self.inference.batch_size, names)

    @torch.no_grad()
    def postprocess(self, images: torch.Tensor, cams: torch.Tensor, logits: torch.Tensor, protocol: str,
                    presence_gt: torch.Tensor | None = None) -> list[Prediction]:
        """Gate, normalise and upsample :meth:`network` output, add background, refine with the CRF, argmax,
        then the dataset's background prior (if any)."""
        presence = select_presence(protocol, logits, self.inference.presence_gate, presence_gt)
        probs = cam_probabilities(cams, presence, tuple(images.shape[-2:]), self.inference.background_power,
                                  normalized=self.tta.normalize_each,
                                  align_corners=self.inference.upsample_align_corners)
        probs_np = list(probs.cpu().numpy())
        pixels = to_uint8_images(images) if self.crf is not None or self.background_prior is not None else []
        if self.crf is None:
            masks = [p.argmax(axis=0).astype(np.uint8) for p in probs_np]
        else:
            unary = probs.softmax(dim=1) if self.inference.crf_softmax else probs
            crf_pixels = pixels if self.inference.crf_image == "exact" else self.crf_images(images)
            masks = self.crf(crf_pixels, list(unary.cpu().numpy()))
        if self.background_prior is not None:
            prior = self.background_prior
            masks = [apply_background_prior(m, px, prior.grey_threshold, prior.min_size, self.classes.background)
                     for m, px in zip(masks, pixels)]
        scores = torch.sigmoid(logits.float()).cpu().numpy()
        presence_np = presence.cpu().numpy()
        return [Prediction(mask=m, probs=p, presence=pr, scores=s, protocol=protocol)
                for m, p, pr, s in zip(masks, probs_np, presence_np, scores)]

    @torch.no_grad()
    def tile_maps(self, images: torch.Tensor) -> torch.Tensor:
        """B×C×h×w maps in [0, 1] that the streaming path averages where tiles overlap: each tile's
        normalised CAMs, gated by its own predicted presence."""
        cams, logits = self.network(images)
        scaled = cams.float() if self.tta.normalize_each else normalize_cams(cams)
        return scaled * presence_from_logits(logits, self.inference.presence_gate)[:, :, None, None]

    def window_probabilities(self, maps: torch.Tensor) -> torch.Tensor:
        """(C+1)×h×w probabilities of averaged :meth:`tile_maps` (C×h×w): the maps and the background channel."""
        background = (1.0 - maps.amax(dim=0, keepdim=True)).clamp_(0.0, 1.0) ** self.inference.background_power
        return torch.cat([maps, background])

    def crf_images(self, images: torch.Tensor) -> list[np.ndarray]:
        """The uint8 pixels the CRF compares (``inference.crf_image``)."""
        if self.inference.crf_image == "denormalized":
            conch = self.config.model.conch
            return denormalized_uint8_images(images, conch.dataset_mean, conch.dataset_std)
        return to_uint8_images(images)

    def predict_batch(self, images: torch.Tensor, presence_gt: torch.Tensor | None = None,
                      protocol: str | None = None, names: Sequence[str] | None = None) -> list[Prediction]:
        """Masks for a B×3×H×W [0, 1] batch; ``protocol`` defaults to ``inference.presence``.

        ``presence_gt`` (B×C) is required by the ground_truth protocol; ``names`` label error messages.
        """
        cams, logits = self.network(images, names)
        return self.postprocess(images, cams, logits, protocol or self.inference.presence, presence_gt)

    def close(self) -> None:
        if self.crf is not None:
            self.crf.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
