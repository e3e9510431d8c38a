"""The frozen vision-language student: what the model, the losses and inference ask of it (method.md §2).

Two implementations exist: :class:`~construct.models.conch.ConchModel` (CONCH) and
:class:`~construct.models.open_clip_student.OpenClipStudent` (QuiltNet-B-16 and OpenAI CLIP
ViT-B/16 through open_clip); docs/students.md says how each one answers the interface.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from construct.models.graphs import FrozenGraphs

CONCH_FILE = "CONCH"
OPEN_CLIP_FILE = "OpenCLIP ViT (QuiltNet-B-16 or OpenAI CLIP)"


class Student(Protocol):
    """A frozen image/text model in eval mode whose parameters never require grad.

    Images are B×3×H×W in [0, 1] with H and W multiples of ``patch_size``; each student
    normalises them itself with the statistics it was trained with.
    """

    name: str
    """The ``model.student.name`` it answers to (recorded in checkpoints)."""
    embed_dim: int
    """Width of the joint image/text embedding space (prototypes live there)."""
    trunk_width: int
    """Channels of the block features (the adapters' width)."""
    patch_size: int
    image_size: int
    """Side the trunk's position embedding is laid out for; other sides are resampled on the fly."""
    graphs: FrozenGraphs | None
    """CUDA-graph replays of the trunk passes (:func:`~construct.models.graphs.enable_fast_path`)."""

    def parameters(self, recurse: bool = True) -> Iterable: ...

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """N texts → N×context-length token ids for :meth:`encode_text`."""

    def encode_text(self, token_ids: Tensor) -> Tensor:
        """Token ids → N×embed_dim L2-normalised text embeddings."""

    def encode_image(self, images: Tensor) -> Tensor:
        """Images → B×embed_dim L2-normalised contrastive embeddings (differentiable in ``images``)."""

    def block_features(self, images: Tensor, blocks: Sequence[int], intensity: float = 1.0) -> list[Tensor]:
        """Outputs of trunk ``blocks`` (0-indexed, before the final norm) as B×C×h×w grids, in request
        order; ``intensity`` multiplies the normalised trunk input (intensity TTA, method.md §7)."""

    def block_features_and_tokens(self, images: Tensor, blocks: Sequence[int]) -> tuple[list[Tensor], Tensor]:
        """:meth:`block_features` and, from the same pass, the B×(1+h·w)×C tokens (class token
        first) that :meth:`encode_weighted_tokens` pools."""

    def encode_weighted_tokens(self, tokens: Tensor, weights: Tensor) -> Tensor:
        """Contrastive embeddings (P×embed_dim) of P weighted views of token sets: ``weights`` P×N,
        non-negative, one per patch token; a zero weight removes its token from the view and the
        gradient reaches the weights (L_sim's token views, method.md §6)."""


def weight_file_kind(keys: Iterable[str]) -> str | None:
    """Which student a state dict's keys belong to (:data:`CONCH_FILE`, :data:`OPEN_CLIP_FILE`), or
    None; lets each loader say in one line that it was given the other student's file."""
    keys = set(keys)
    if any(k.startswith("visual.trunk.") for k in keys):
        return CONCH_FILE
    if "visual.conv1.weight" in keys and "token_embedding.weight" in keys:
        return OPEN_CLIP_FILE
    return None
