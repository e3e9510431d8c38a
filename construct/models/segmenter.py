"""The stage-2 segmenter: a SegFormer (MiT encoder + all-MLP decode head) with C + 1 outputs.

Stage 2 trains it on stage 1's pseudo-masks; at inference it maps a tile to class probabilities
directly, background included, so it needs no class presence, no background channel and no CRF.
Its encoder starts from the MiT weights the teacher already uses (construct/models/segformer.py
reads them); its decode head starts random.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from construct.checkpoint import check_classes, require_stage
from construct.constants import IMAGENET_MEAN, IMAGENET_STD
from construct.errors import CheckpointError
from construct.models.segformer import load_mit_teacher, mit_config

DECODER_WIDTHS = {"mit_b0": 256, "mit_b1": 256, "mit_b2": 768, "mit_b3": 768, "mit_b4": 768, "mit_b5": 768, "tiny": 64}
"""Channels of the decode head's MLPs per size (the SegFormer paper's; tiny: a quarter of B0's)."""


@dataclass(frozen=True)
class SegmenterArchitecture:
    """What builds the network again from a checkpoint, whatever config it is read with."""

    backbone: str
    preset: str
    num_labels: int
    """C + 1: the tissue classes in label order, then background."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> SegmenterArchitecture:
        try:
            architecture = cls(str(values["backbone"]), str(values["preset"]), int(values["num_labels"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{source}: its 'architecture' entry is incomplete: {values!r}") from None
        if architecture.backbone != "segformer" or architecture.preset not in DECODER_WIDTHS:
            raise CheckpointError(f"{source}: unknown segmenter {architecture.backbone} {architecture.preset}")
        return architecture


def segformer_config(architecture: SegmenterArchitecture) -> SegformerConfig:
    """The transformers config of a SegFormer of ``architecture`` (no dropout in the head: tiles are few)."""
    encoder = {key: value for key, value in mit_config(architecture.preset).to_dict().items()
               if key not in ("id2label", "label2id")}
    return SegformerConfig(**{**encoder, "num_labels": architecture.num_labels,
                              "decoder_hidden_size": DECODER_WIDTHS[architecture.preset],
                              "classifier_dropout_prob": 0.0})


class Segmenter(nn.Module):
    """[0, 1] RGB tiles -> C + 1 class logits at a quarter of the input's resolution (SegFormer's output grid)."""

    def __init__(self, architecture: SegmenterArchitecture) -> None:
        super().__init__()
        self.architecture = architecture
        self.segformer = SegformerForSemanticSegmentation(segformer_config(architecture))
        # Non-persistent: the state dict is the transformers model's own.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def num_labels(self) -> int:
        return self.architecture.num_labels

    def forward(self, images: Tensor) -> Tensor:
        """B×3×H×W in [0, 1] -> B×(C+1)×(H/4)×(W/4) logits."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected B×3×H×W images, got shape {tuple(images.shape)}")
        return self.segformer(pixel_values=(images - self.mean) / self.std).logits

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.segformer.segformer.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.segformer.decode_head.parameters())


def build_segmenter(architecture: SegmenterArchitecture, encoder_checkpoint: str | None = None) -> Segmenter:
    """A segmenter whose encoder holds ``encoder_checkpoint``'s MiT weights (random when None).

    The weights are read and checked strictly by the teacher's loader, so every format it reads
    (Hugging Face folder, NVlabs or mmseg .pth) initialises the segmenter too.
    """
    segmenter = Segmenter(architecture)
    if encoder_checkpoint is not None:
        encoder = load_mit_teacher(encoder_checkpoint, preset=architecture.preset).segformer
        segmenter.segformer.segformer.load_state_dict(encoder.state_dict(), strict=True)
    return segmenter


def architecture_for(num_classes: int, backbone: str, preset: str) -> SegmenterArchitecture:
    """The architecture of a segmenter of ``num_classes`` tissue classes (plus background)."""
    return SegmenterArchitecture(backbone, preset, num_classes + 1)


def load_trained_segmenter(checkpoint: dict[str, Any], path: str | Path, class_names: Sequence[str],
                           device: torch.device | str = "cpu") -> Segmenter:
    """The segmenter of a stage-2 checkpoint (already read), in eval mode on ``device``.

    Its architecture comes from the checkpoint, so any config of the same classes reads it; no MiT
    weight file is needed (the checkpoint holds every weight).
    """
    require_stage(checkpoint, 2, path, "the segmenter loader")
    check_classes(checkpoint, class_names, path)
    segmenter = Segmenter(SegmenterArchitecture.from_dict(checkpoint.get("architecture") or {}, str(path)))
    try:
        segmenter.segformer.load_state_dict(checkpoint["model"], strict=True)
    except (KeyError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: its weights do not fit its segmenter architecture: {reason}") from None
    return segmenter.to(device).eval()
