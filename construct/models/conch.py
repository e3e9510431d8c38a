"""Frozen CONCH (CoCa-style ViT-B/16 vision-language model) built from timm and open_clip parts.

Only what ConStruct uses is built: the visual tower, the text tower and ``logit_scale``. Parameter
names and shapes equal the official checkpoint's, so its file loads strictly (method.md §2).
"""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from construct.checkpoint import read_weight_file
from construct.constants import CLIP_MEAN, CLIP_STD
from construct.errors import CheckpointError, ConfigError
from construct.models.graphs import FrozenGraphs
from construct.models.student import OPEN_CLIP_FILE, weight_file_kind

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

DEFAULT_CHECKPOINT = "pretrained_models/conch/pytorch_model.bin"
TOKENIZER_FILE = "conch_byte_level_bpe_uncased.json"
CONTEXT_LENGTH = 128
"""Token ids per text; the text tower replaces the last one with its CLS embedding."""
VOCAB_SIZE = 32007
EMBED_DIM = 512
PATCH_SIZE = 16
POOLER_HEADS = 8
IGNORED_PREFIX = "text_decoder."
POS_EMBED_KEY = "visual.trunk.pos_embed"
OPEN_CLIP_FOLDER_FILES = ("open_clip_config.json", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")
"""Files of a Hugging Face OpenCLIP folder: given as the CONCH checkpoint, they name the mistake."""


@dataclass(frozen=True)
class ConchPreset:
    """Tower sizes of one model variant (the output embedding is always ``EMBED_DIM``)."""

    trunk_width: int
    trunk_depth: int
    trunk_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    caption_queries: int


PRESETS: dict[str, ConchPreset] = {
    "vit_b16": ConchPreset(768, 12, 12, 768, 12, 12, 256),
    "tiny": ConchPreset(192, 4, 3, 128, 2, 2, 16),
}


class _VisualTower(nn.Module):
    """Container whose attribute names give the checkpoint's ``visual.*`` keys.

    The caption pooler is never run; it exists so the official file loads strictly.
    """

    def __init__(self, preset: ConchPreset, image_size: int) -> None:
        super().__init__()
        # Deferred: importing open_clip pulls in transformers and torchvision (seconds on a CPU),
        # which CLI start-up, config errors and CRF worker processes need not pay for.
        from open_clip.transformer import AttentionalPooler

        width = preset.trunk_width
        self.trunk = VisionTransformer(
            embed_dim=width,
            depth=preset.trunk_depth,
            num_heads=preset.trunk_heads,
            mlp_ratio=4,
            img_size=image_size,
            patch_size=PATCH_SIZE,
            num_classes=0,
            dynamic_img_size=True,
        )
        self.attn_pool_contrast = AttentionalPooler(
            d_model=EMBED_DIM, context_dim=width, n_head=POOLER_HEADS, n_queries=1
        )
        self.ln_contrast = nn.LayerNorm(EMBED_DIM)
        # std 1/sqrt(fan_in) keeps the projection's output scale at its input's
        self.proj_contrast = nn.Parameter(torch.randn(EMBED_DIM, EMBED_DIM) * EMBED_DIM**-0.5)
        self.attn_pool_caption = AttentionalPooler(
            d_model=width, context_dim=width, n_head=POOLER_HEADS, n_queries=preset.caption_queries
        )
        self.ln_caption = nn.LayerNorm(width)


class ConchModel(nn.Module):
    """Frozen CONCH image/text encoders; always in eval mode, no parameter requires grad.

    Images are [0, 1] RGB; normalisation happens inside: CLIP's, unless
    :meth:`set_feature_normalization` gives the feature pass (block features, trunk tokens) others.
    The :class:`~construct.models.student.Student` named ``conch``: block features from the timm
    trunk's blocks, CONCH's 128-token BPE text tower, and the contrastive attentional pooler for
    image embeddings and token views.
    """

    name = "conch"
    patch_size = PATCH_SIZE

    def __init__(
        self, preset: str = "vit_b16", image_size: int = 224, pad_id: int = 0, tokenizer_path: str | None = None
    ) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ConfigError(f"unknown CONCH preset {preset!r}; choose one of {', '.join(PRESETS)}")
        if image_size <= 0 or image_size % PATCH_SIZE:
            raise ConfigError(f"CONCH image_size must be a positive multiple of {PATCH_SIZE}, got {image_size}")
        cfg = PRESETS[preset]
        self.preset = preset
        self.image_size = image_size
        self.tokenizer_path = tokenizer_path
        self.embed_dim = EMBED_DIM
        self.trunk_width = cfg.trunk_width
        from open_clip.transformer import TextTransformer  # deferred, see _VisualTower

        self.visual = _VisualTower(cfg, image_size)
        self.text = TextTransformer(
            # embed_cls adds one position for the CLS embedding: 127 + 1 = CONTEXT_LENGTH
            context_length=CONTEXT_LENGTH - 1,
            vocab_size=VOCAB_SIZE,
            width=cfg.text_width,
            heads=cfg.text_heads,
            layers=cfg.text_layers,
            output_dim=EMBED_DIM,
            embed_cls=True,
            pad_id=pad_id,
            pool_type="last",
            act_layer=nn.GELU,
            norm_layer=nn.LayerNorm,
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.graphs: FrozenGraphs | None = None
        """Set by :func:`~construct.models.graphs.enable_fast_path`: trunk passes on CUDA replay graphs."""
        self.register_buffer("pixel_mean", torch.empty(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.empty(1, 3, 1, 1), persistent=False)
        self.register_buffer("feature_mean", torch.empty(1, 3, 1, 1), persistent=False)
        self.register_buffer("feature_std", torch.empty(1, 3, 1, 1), persistent=False)
        self.feature_stats: tuple[Sequence[float], Sequence[float]] = (CLIP_MEAN, CLIP_STD)
        self._set_buffers()
        self.requires_grad_(False)
        self.train(False)

    def _set_buffers(self) -> None:
        """Fill the non-persistent buffers, which no checkpoint carries."""
        self.pixel_mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        self.feature_mean = torch.tensor(self.feature_stats[0], dtype=torch.float32).view(1, 3, 1, 1)
        self.feature_std = torch.tensor(self.feature_stats[1], dtype=torch.float32).view(1, 3, 1, 1)
        self.text.attn_mask = self.text.build_causal_mask()

    def train(self, mode: bool = True) -> ConchModel:
        # A frozen feature extractor: whatever a parent module asks, stay in eval mode.
        return super().train(False)

    def set_feature_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Normalise the feature pass with ``mean``/``std`` instead of CLIP's (the released code feeds
        CONCH dataset-normalised pixels); :meth:`encode_image` keeps CLIP's."""
        self.feature_stats = (tuple(mean), tuple(std))
        device = self.pixel_mean.device
        self._set_buffers()
        self.to(device)

    def _normalise(self, images: Tensor, features: bool = False) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"CONCH expects B×3×H×W images, got shape {tuple(images.shape)}")
        if images.shape[2] % PATCH_SIZE or images.shape[3] % PATCH_SIZE:
            raise ValueError(
                f"CONCH image height and width must be multiples of {PATCH_SIZE}, got {tuple(images.shape[2:])}"
            )
        if features:
            return (images - self.feature_mean) / self.feature_std
        return (images - self.pixel_mean) / self.pixel_std

    def encode_image(self, images: Tensor) -> Tensor:
        """B×3×H×W [0, 1] images → B×512 L2-normalised contrastive embeddings (differentiable in ``images``)."""
        tokens = self.visual.trunk.forward_features(self._normalise(images))
        pooled = self.visual.ln_contrast(self.visual.attn_pool_contrast(tokens)[:, 0])
        return F.normalize(pooled @ self.visual.proj_contrast, dim=-1)

    def encode_text(self, token_ids: Tensor) -> Tensor:
        """N×128 ids from :func:`tokenize` → N×512 L2-normalised text embeddings."""
        if token_ids.ndim != 2 or token_ids.shape[1] != CONTEXT_LENGTH:
            raise ValueError(f"CONCH expects N×{CONTEXT_LENGTH} token ids, got shape {tuple(token_ids.shape)}")
        # the last slot is where the text tower appends its CLS embedding
        return F.normalize(self.text(token_ids[:, :-1]), dim=-1)

    def block_features(self, images: Tensor, blocks: Sequence[int] = (2, 5, 8, 11), intensity: float = 1.0) -> list[Tensor]:
        """Outputs of trunk ``blocks`` (0-indexed, before the final norm) as B×C×h×w grids, in request order.

        ``intensity`` multiplies the normalised tensor the trunk receives: the intensity test-time
        augmentation of the authors' code, which scales its already-normalised input (method.md §7).
        """
        return self._trunk(images, blocks, intensity, final_tokens=False)[0]

    def block_features_and_tokens(self, images: Tensor, blocks: Sequence[int]) -> tuple[list[Tensor], Tensor]:
        """:meth:`block_features` and, from the same pass, the final-norm tokens of the last block
        (B×(1+h·w)×C, class token first): what :meth:`encode_image` pools."""
        grids, tokens = self._trunk(images, blocks, 1.0, final_tokens=True)
        return grids, tokens

    def _trunk(self, images: Tensor, blocks: Sequence[int], intensity: float,
               final_tokens: bool) -> tuple[list[Tensor], Tensor | None]:
        depth = len(self.visual.trunk.blocks)
        wanted = sorted(set(blocks))
        if not wanted or wanted[0] < 0 or wanted[-1] >= depth:
            raise ValueError(f"CONCH blocks must be a non-empty selection of 0..{depth - 1}, got {tuple(blocks)}")
        if self.graphs is not None and images.is_cuda and not torch.is_grad_enabled():
            key = ("trunk", tuple(blocks), intensity, final_tokens)
            return self.graphs.run(key, partial(self._trunk_pass, blocks=blocks, wanted=wanted, intensity=intensity,
                                                final_tokens=final_tokens), images)
        return self._trunk_pass(images, blocks, wanted, intensity, final_tokens)

    def _trunk_pass(self, images: Tensor, blocks: Sequence[int], wanted: list[int], intensity: float,
                    final_tokens: bool) -> tuple[list[Tensor], Tensor | None]:
        normalised = self._normalise(images, features=True)
        out = self.visual.trunk.forward_intermediates(
            normalised if intensity == 1.0 else normalised * intensity,
            indices=wanted,
            norm=False,
            stop_early=not final_tokens,
            output_fmt="NCHW",
            intermediates_only=not final_tokens,
        )
        tokens, grids = out if final_tokens else (None, out)
        by_block = dict(zip(wanted, grids))
        return [by_block[b] for b in blocks], tokens

    def encode_weighted_tokens(self, tokens: Tensor, weights: Tensor) -> Tensor:
        """Contrastive embeddings of weighted views of token sets, without another trunk pass.

        ``tokens``: P×(1+N)×C final-norm trunk tokens (:meth:`block_features_and_tokens`);
        ``weights``: P×N non-negative weights of the patch tokens. The contrastive attentional
        pooler attends only to patch tokens (the class token has seen the whole image), with
        log(weight) added to its attention logits: a zero-weight token is ignored (unless every
        weight of a view is zero: then all count alike), and the gradient reaches the weights. LN and projection follow as in :meth:`encode_image`.
        """
        pooler = self.visual.attn_pool_contrast
        patches = pooler.ln_k(tokens[:, 1:])
        if weights.shape != patches.shape[:2]:
            raise ValueError(f"weights {tuple(weights.shape)} must be P×N for tokens {tuple(tokens.shape)}")
        # The pooler's one-query attention, written out: fused attention kernels reject an additive
        # bias of this shape in their backward pass on CUDA, and one query costs nothing explicitly.
        attn = pooler.attn
        heads, width = attn.num_heads, attn.embed_dim
        q_bias, k_bias, v_bias = attn.in_proj_bias.split(width)
        query = F.linear(pooler.ln_q(pooler.query), attn.q_proj_weight, q_bias)  # 1×E
        keys = F.linear(patches, attn.k_proj_weight, k_bias)  # P×N×E
        values = F.linear(patches, attn.v_proj_weight, v_bias)
        count, length = keys.shape[:2]
        query = query.view(1, heads, 1, width // heads)
        keys = keys.view(count, length, heads, -1).transpose(1, 2)  # P×h×N×d
        values = values.view(count, length, heads, -1).transpose(1, 2)
        logits = (query @ keys.transpose(-1, -2)) * (width // heads) ** -0.5  # P×h×1×N
        logits = logits + torch.log(weights.float().clamp_min(1e-6)).to(logits.dtype)[:, None, None, :]
        pooled = (logits.softmax(dim=-1) @ values).transpose(1, 2).reshape(count, width)
        pooled = attn.out_proj(pooled)
        return F.normalize(self.visual.ln_contrast(pooled) @ self.visual.proj_contrast, dim=-1)

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """:func:`tokenize` with the tokenizer this model was built for."""
        return tokenize(texts, self.tokenizer_path)


def load_conch(
    checkpoint_path: str | None,
    image_size: int = 224,
    preset: str = "vit_b16",
    tokenizer_path: str | None = None,
) -> ConchModel:
    """Frozen CONCH; ``checkpoint_path=None`` gives random weights drawn from the caller's torch RNG.

    The checkpoint's ``visual.trunk.pos_embed`` is resampled to the ``image_size`` grid (bilinear,
    no antialiasing, class token kept) as the reference loader does; ``text_decoder.*`` is ignored.
    """
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    if path is not None and path.is_dir() and any((path / name).is_file() for name in OPEN_CLIP_FOLDER_FILES):
        raise CheckpointError(f"CONCH checkpoint {path} is an {OPEN_CLIP_FILE} folder, not CONCH: set "
                              f"model.student.name: quiltnet (or openai_clip) and model.student.checkpoint: {path}")
    if path is not None and not path.is_file():
        raise CheckpointError(
            f"CONCH checkpoint not found: {path}. Download pytorch_model.bin from the gated Hugging Face repo "
            f"MahmoodLab/conch (accept its licence there first) and put it at {DEFAULT_CHECKPOINT}"
        )
    pad_id = _tokenizer(_tokenizer_file(tokenizer_path)).pad_token_id
    if path is None:
        return ConchModel(preset, image_size, pad_id=pad_id, tokenizer_path=tokenizer_path)
    state = _read_state_dict(path)
    # Build without storage and adopt the checkpoint's tensors: the random initialisation it would
    # overwrite costs seconds and a second copy of the weights (≈0.8 GB for vit_b16).
    with torch.device("meta"):
        model = ConchModel(preset, image_size, pad_id=pad_id, tokenizer_path=tokenizer_path)
    state = {k: v.float() for k, v in _fit_state_dict(state, model, path).items()}
    model.load_state_dict(state, strict=True, assign=True)
    model._set_buffers()
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise RuntimeError("CONCH: a tensor was left unmaterialised after loading")
    return model


def tokenize(texts: Sequence[str], tokenizer_path: str | None = None) -> Tensor:
    """CONCH tokenisation: N texts → N×128 ids (special tokens, padded/truncated to 127, one pad appended)."""
    if isinstance(texts, str):
        raise TypeError("tokenize expects a sequence of strings, not a single string")
    tokenizer = _tokenizer(_tokenizer_file(tokenizer_path))
    if not texts:  # the tokenizer itself fails on an empty batch
        return torch.empty(0, CONTEXT_LENGTH, dtype=torch.long)
    ids = tokenizer(
        list(texts),
        max_length=CONTEXT_LENGTH - 1,
        padding="max_length",
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )["input_ids"]
    # placeholder for the CLS slot that ConchModel.encode_text drops
    return F.pad(ids, (0, 1), value=tokenizer.pad_token_id)


def _tokenizer_file(tokenizer_path: str | None) -> str:
    if tokenizer_path is not None:
        path = Path(tokenizer_path)
        if not path.is_file():
            raise CheckpointError(f"CONCH tokenizer file not found: {path}")
        return str(path)
    try:
        package = importlib.resources.files("conch")
    except ModuleNotFoundError as exc:
        raise CheckpointError(
            f"CONCH tokenizer: the conch-fork package (which ships {TOKENIZER_FILE}) is not installed; "
            "install it or pass tokenizer_path"
        ) from exc
    path = Path(str(package / "open_clip_custom" / "tokenizers" / TOKENIZER_FILE))
    if not path.is_file():
        raise CheckpointError(f"CONCH tokenizer file not found in the conch-fork package: {path}")
    return str(path)


@lru_cache(maxsize=4)
def _tokenizer(path: str) -> PreTrainedTokenizerFast:
    # transformers is slow to import; only tokenisation needs it
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=path, bos_token="<start_of_text>", eos_token="<end_of_text>", pad_token="<pad>"
    )


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    state = read_weight_file(path, "CONCH checkpoint")
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"CONCH checkpoint {path} is not a plain state dict (name → tensor)")
    if weight_file_kind(state) == OPEN_CLIP_FILE:
        raise CheckpointError(f"CONCH checkpoint {path} is an {OPEN_CLIP_FILE} file, not CONCH: set "
                              f"model.student.name: quiltnet (or openai_clip) and model.student.checkpoint: {path}")
    return dict(state)


def _fit_state_dict(state: dict[str, Tensor], model: ConchModel, source: Path) -> dict[str, Tensor]:
    """Drop ``text_decoder.*``, resample pos_embed to the model's grid, and reject any other mismatch."""
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIX)}
    pos = state.get(POS_EMBED_KEY)
    target = expected[POS_EMBED_KEY]
    if pos is not None and pos.shape != target.shape and _is_square_grid(pos, target):
        state[POS_EMBED_KEY] = resample_abs_pos_embed(
            pos,
            new_size=list(model.visual.trunk.patch_embed.grid_size),
            num_prefix_tokens=1,
            interpolation="bilinear",
            antialias=False,
        )
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshaped = [
        f"{k} {list(state[k].shape)} (model {list(expected[k].shape)})"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k].shape
    ]
    problems = [
        f"{label}: {_key_list(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"CONCH checkpoint {source} does not fit preset {model.preset!r}: " + "; ".join(problems)
        )
    return state


def _is_square_grid(pos: Tensor, target: Tensor) -> bool:
    """Whether ``pos`` is a class token + square patch grid of the model's width (so it can be resampled)."""
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != target.shape[2] or pos.shape[1] < 2:
        return False
    side = math.isqrt(pos.shape[1] - 1)
    return side * side == pos.shape[1] - 1


def _key_list(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")
