"""The ConStruct model: frozen student (CONCH or an OpenCLIP ViT) → feature pyramid → adapters → prototype CAMs → logits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from construct.models.adapters import ResidualAdapter
from construct.models.prototypes import AdaptiveLayer, PrototypeBank
from construct.models.student import Student


@dataclass
class ConStructOutput:
    """What one forward pass returns (fields by name, never by position)."""

    cams: torch.Tensor
    """B×num_classes×h×w fused CAMs (scaled cosine) on the finest CAM-level grid."""
    logits: torch.Tensor
    """B×num_classes image logits: weighted mean of the per-level GAP logits."""
    level_logits: list[torch.Tensor]
    """GAP logits of each CAM level, in ``cam_levels`` order (each B×num_classes)."""
    refined: dict[int, torch.Tensor]
    """Adapter outputs per pyramid level (B×C×h×w), for every level that is computed."""
    tokens: torch.Tensor | None = None
    """The student's tokens for L_sim's token views (B×(1+h·w)×C, see
    :meth:`~construct.models.student.Student.block_features_and_tokens`), when asked for."""


def resize_level(features: torch.Tensor, scale: float) -> torch.Tensor:
    """Resize a patch grid: bilinear up for scale ≥ 1, average pooling for 1/k."""
    if scale >= 1.0:
        if scale == 1.0:
            return features
        return F.interpolate(features, scale_factor=scale, mode="bilinear", align_corners=False)
    return F.avg_pool2d(features, kernel_size=round(1.0 / scale))


class ConStructModel(nn.Module):
    """Prototype-based CAM model on a frozen vision-language student (:class:`~construct.models.student.Student`).

    Only the pyramid levels that feed CAMs are computed and own an adapter. The structural loss
    is applied to those same refined features, so distillation shapes the CAMs (method.md §9.1).
    ``extra_levels`` adds adapters on levels that feed no CAM (the released code distils one:
    ``model.allow_unused_distill_levels``).
    """

    def __init__(
        self,
        student: Student,
        text_embeddings: torch.Tensor,
        feature_blocks: list[int],
        level_scales: list[float],
        cam_levels: list[int],
        cam_level_weights: list[float],
        prototypes_per_class: int,
        projector_ratio: float,
        cam_scale_init: float,
        extra_levels: Sequence[int] = (),
        adapter_padding: str = "reflect",
        projector_input: str = "normalized",
        projector_init: str = "default",
    ) -> None:
        super().__init__()
        self.student = student
        self.feature_blocks = list(feature_blocks)
        self.level_scales = list(level_scales)
        self.cam_levels = list(cam_levels)
        self.cam_level_weights = list(cam_level_weights)
        width = student.trunk_width
        levels = sorted(set(cam_levels) | set(extra_levels))
        self.adapters = nn.ModuleDict({str(level): ResidualAdapter(width, adapter_padding) for level in levels})
        self.prototypes = PrototypeBank(text_embeddings, prototypes_per_class)
        self.projector_input = projector_input
        self.adaptive_layer = AdaptiveLayer(self.prototypes.dim, width, projector_ratio, projector_init)
        self.cam_scale = nn.Parameter(torch.tensor(float(cam_scale_init)))

    @property
    def num_classes(self) -> int:
        return self.prototypes.num_classes

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen student's weights: what a checkpoint stores."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Strict load of :meth:`trainable_state_dict` output; raises KeyError/RuntimeError on mismatch."""
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
        if missing or unexpected or shapes:
            raise KeyError(_describe_mismatch(missing, unexpected, shapes))
        self.load_state_dict(state, strict=False)

    def pyramid(self, images: torch.Tensor, intensity: float = 1.0,
                with_tokens: bool = False) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """Frozen student block features of the CAM levels, resized to their pyramid scales, and the
        final trunk tokens when ``with_tokens`` (from the same pass, which then runs every block).

        ``intensity`` multiplies the student's normalised input (see :meth:`Student.block_features`).
        """
        levels = sorted(self.adapters.keys(), key=int)
        blocks = tuple(self.feature_blocks[int(level)] for level in levels)
        tokens = None
        with torch.no_grad():
            if with_tokens:
                if intensity != 1.0:
                    raise ValueError("trunk tokens are only taken from plain (intensity 1.0) passes")
                grids, tokens = self.student.block_features_and_tokens(images, blocks=blocks)
            else:
                grids = self.student.block_features(images, blocks=blocks, intensity=intensity)
        pyramid = {int(level): resize_level(grid.float(), self.level_scales[int(level)]) for level, grid in zip(levels, grids)}
        return pyramid, tokens

    def level_cam(self, refined: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarity of every position with every class (max over its prototypes)."""
        features = F.normalize(refined, dim=1)
        sims = torch.einsum("bchw,kc->bkhw", features, F.normalize(projected, dim=-1))
        return self.prototypes.reduce_per_class(sims * self.cam_scale)

    def forward(self, images: torch.Tensor, intensity: float = 1.0, with_tokens: bool = False) -> ConStructOutput:
        """One pass on B×3×H×W [0, 1] images; ``intensity`` ≠ 1 is intensity TTA (see :meth:`pyramid`);
        ``with_tokens`` also returns the student's tokens for L_sim's token views."""
        grids, tokens = self.pyramid(images, intensity, with_tokens)
        refined = {level: self.adapters[str(level)](grid) for level, grid in grids.items()}
        projected = self.adaptive_layer(self.prototypes.prototypes if self.projector_input == "raw" else self.prototypes())
        level_cams = [self.level_cam(refined[level], projected) for level in self.cam_levels]
        level_logits = [cam.mean(dim=(2, 3)) for cam in level_cams]
        total = sum(self.cam_level_weights)
        finest = max(level_cams, key=lambda cam: cam.shape[-1]).shape[-2:]
        cams = sum(
            w * F.interpolate(cam, size=finest, mode="bilinear", align_corners=False)
            for w, cam in zip(self.cam_level_weights, level_cams)
        ) / total
        logits = sum(w * lg for w, lg in zip(self.cam_level_weights, level_logits)) / total
        return ConStructOutput(cams=cams, logits=logits, level_logits=level_logits, refined=refined, tokens=tokens)


def _describe_mismatch(missing: list[str], unexpected: list[str], shapes: list[str], limit: int = 8) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            shown = ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts)
