"""Frozen OpenCLIP ViT-B/16 students: QuiltNet-B-16 and OpenAI CLIP ViT-B/16 (docs/students.md).

The model is open_clip's own ``CLIP`` (so a Hugging Face ``open_clip_pytorch_model.bin`` loads
strictly into it, key for key); this module adds what ConStruct asks of a student
(:class:`~construct.models.student.Student`): block features, text embeddings, and the pooled
embeddings of weighted token views for L_sim.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from construct.checkpoint import read_weight_file
from construct.constants import CLIP_MEAN, CLIP_STD
from construct.errors import CheckpointError, ConfigError
from construct.models.graphs import FrozenGraphs
from construct.models.student import CONCH_FILE, weight_file_kind

if TYPE_CHECKING:
    from open_clip.tokenizer import SimpleTokenizer

EMBED_DIM = 512
PATCH_SIZE = 16
CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
HEAD_WIDTH = 64
CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""Weight files looked for in a downloaded folder, in this order."""
POS_EMBED_KEY = "visual.positional_embedding"


@dataclass(frozen=True)
class OpenClipSpec:
    """One set of weights for the OpenCLIP ViT-B/16 architecture."""

    title: str
    quick_gelu: bool
    """Activation the weights were trained with: QuickGELU (OpenAI's) or exact GELU."""
    folder: str
    """Where the configs expect the Hugging Face folder."""
    repo: str
    """Hugging Face repository the folder is downloaded from."""


SPECS: dict[str, OpenClipSpec] = {
    "quiltnet": OpenClipSpec("QuiltNet-B-16", False, "pretrained_models/quiltnet", "wisdomik/QuiltNet-B-16"),
    "openai_clip": OpenClipSpec("OpenAI CLIP ViT-B/16", True, "pretrained_models/openai_clip",
                                "timm/vit_base_patch16_clip_224.openai"),
}


@dataclass(frozen=True)
class OpenClipPreset:
    """Tower sizes (the vision tower has one head per 64 channels)."""

    width: int
    layers: int
    text_width: int
    text_heads: int
    text_layers: int


PRESETS: dict[str, OpenClipPreset] = {
    "vit_b16": OpenClipPreset(768, 12, 512, 8, 12),
    "tiny": OpenClipPreset(192, 4, 128, 2, 2),
}


class OpenClipStudent(nn.Module):
    """Frozen OpenCLIP ViT-B/16 image/text encoders; always in eval mode, no parameter requires grad.

    - Block features: outputs of ``clip.visual.transformer.resblocks[i]`` (before ``ln_post``).
    - Normalisation: OpenAI CLIP's mean/std (both QuiltNet-B-16 and OpenAI CLIP were trained with it).
    - Text: open_clip's CLIP BPE tokenizer (shipped in its wheel), 77 tokens; the EOT token's
      final-norm state through ``text_projection``.
    - Image embedding: the class token after ``ln_post``, through ``proj``.
    - Token views (:meth:`encode_weighted_tokens`): see there.
    """

    patch_size = PATCH_SIZE

    def __init__(self, name: str = "quiltnet", preset: str = "vit_b16", image_size: int = 224) -> None:
        super().__init__()
        if name not in SPECS:
            raise ConfigError(f"unknown OpenCLIP student {name!r}; choose one of {', '.join(SPECS)}")
        if preset not in PRESETS:
            raise ConfigError(f"unknown OpenCLIP student preset {preset!r}; choose one of {', '.join(PRESETS)}")
        if image_size <= 0 or image_size % PATCH_SIZE:
            raise ConfigError(f"student image_size must be a positive multiple of {PATCH_SIZE}, got {image_size}")
        # Deferred: importing open_clip pulls in transformers and torchvision (seconds on a CPU).
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        cfg = PRESETS[preset]
        self.name = name
        self.spec = SPECS[name]
        self.preset = preset
        self.image_size = image_size
        self.embed_dim = EMBED_DIM
        self.trunk_width = cfg.width
        self.clip = CLIP(
            embed_dim=EMBED_DIM,
            vision_cfg=CLIPVisionCfg(layers=cfg.layers, width=cfg.width, head_width=HEAD_WIDTH,
                                     patch_size=PATCH_SIZE, image_size=image_size),
            text_cfg=CLIPTextCfg(context_length=CONTEXT_LENGTH, vocab_size=VOCAB_SIZE, width=cfg.text_width,
                                 heads=cfg.text_heads, layers=cfg.text_layers),
            quick_gelu=self.spec.quick_gelu,
        )
        self.graphs: FrozenGraphs | None = None
        self.register_buffer("pixel_mean", torch.empty(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.empty(1, 3, 1, 1), persistent=False)
        self._set_buffers()
        self.requires_grad_(False)
        self.train(False)

    def _set_buffers(self) -> None:
        """Fill the non-persistent buffers, which no weight file carries."""
        self.pixel_mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        self.clip.attn_mask = torch.full((CONTEXT_LENGTH, CONTEXT_LENGTH), float("-inf")).triu_(1)

    def train(self, mode: bool = True) -> OpenClipStudent:
        # A frozen feature extractor: whatever a parent module asks, stay in eval mode.
        return super().train(False)

    @property
    def depth(self) -> int:
        return len(self.clip.visual.transformer.resblocks)

    def _normalise(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.spec.title} expects B×3×H×W images, got shape {tuple(images.shape)}")
        if images.shape[2] % PATCH_SIZE or images.shape[3] % PATCH_SIZE:
            raise ValueError(f"{self.spec.title} image height and width must be multiples of {PATCH_SIZE}, "
                             f"got {tuple(images.shape[2:])}")
        return (images - self.pixel_mean) / self.pixel_std

    def _embed(self, normalised: Tensor) -> Tensor:
        """Patch and class tokens with position embeddings (resampled for a grid other than the
        model's, as the CONCH trunk does) and ``ln_pre``: the first block's input."""
        visual = self.clip.visual
        patches = visual.conv1(normalised)
        grid = tuple(patches.shape[-2:])
        tokens = patches.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        pos = visual.positional_embedding
        if grid != tuple(visual.grid_size):
            pos = resample_abs_pos_embed(pos[None], new_size=list(grid), old_size=list(visual.grid_size),
                                         num_prefix_tokens=1)[0]
        return visual.ln_pre(tokens + pos.to(tokens.dtype))

    def encode_image(self, images: Tensor) -> Tensor:
        """B×3×H×W [0, 1] images → B×512 L2-normalised contrastive embeddings (differentiable in ``images``)."""
        tokens = self._embed(self._normalise(images))
        for block in self.clip.visual.transformer.resblocks:
            tokens = block(tokens)
        pooled = self.clip.visual.ln_post(tokens[:, 0])
        return F.normalize(pooled @ self.clip.visual.proj, dim=-1)

    def encode_text(self, token_ids: Tensor) -> Tensor:
        """N×77 ids from :meth:`tokenize` → N×512 L2-normalised text embeddings."""
        if token_ids.ndim != 2 or token_ids.shape[1] != CONTEXT_LENGTH:
            raise ValueError(f"{self.spec.title} expects N×{CONTEXT_LENGTH} token ids, got shape {tuple(token_ids.shape)}")
        return self.clip.encode_text(token_ids, normalize=True)

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """CLIP BPE tokenisation: N texts → N×77 ids (start and end tokens, zero-padded, truncated)."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a sequence of strings, not a single string")
        return _tokenizer()(list(texts))

    def block_features(self, images: Tensor, blocks: Sequence[int] = (2, 5, 8, 11), intensity: float = 1.0) -> list[Tensor]:
        """Outputs of ``blocks`` (0-indexed, before ``ln_post``) as B×C×h×w grids, in request order;
        ``intensity`` multiplies the normalised input (intensity TTA, method.md §7)."""
        return self._trunk(images, blocks, intensity, final_tokens=False)[0]

    def block_features_and_tokens(self, images: Tensor, blocks: Sequence[int]) -> tuple[list[Tensor], Tensor]:
        """:meth:`block_features` and, from the same pass, the last block's input tokens
        (B×(1+h·w)×C, class token first): what :meth:`encode_weighted_tokens` pools."""
        grids, tokens = self._trunk(images, blocks, 1.0, final_tokens=True)
        return grids, tokens

    def _trunk(self, images: Tensor, blocks: Sequence[int], intensity: float,
               final_tokens: bool) -> tuple[list[Tensor], Tensor | None]:
        wanted = sorted(set(blocks))
        if not wanted or wanted[0] < 0 or wanted[-1] >= self.depth:
            raise ValueError(f"{self.spec.title} blocks must be a non-empty selection of 0..{self.depth - 1}, "
                             f"got {tuple(blocks)}")
        if self.graphs is not None and images.is_cuda and not torch.is_grad_enabled():
            key = ("trunk", tuple(blocks), intensity, final_tokens)
            return self.graphs.run(key, partial(self._trunk_pass, blocks=blocks, wanted=wanted, intensity=intensity,
                                                final_tokens=final_tokens), images)
        return self._trunk_pass(images, blocks, wanted, intensity, final_tokens)

    def _trunk_pass(self, images: Tensor, blocks: Sequence[int], wanted: list[int], intensity: float,
                    final_tokens: bool) -> tuple[list[Tensor], Tensor | None]:
        normalised = self._normalise(images)
        tokens = self._embed(normalised if intensity == 1.0 else normalised * intensity)
        side_h, side_w = images.shape[2] // PATCH_SIZE, images.shape[3] // PATCH_SIZE
        last = self.depth - 1 if final_tokens else wanted[-1]
        by_block: dict[int, Tensor] = {}
        last_input = None
        for index, block in enumerate(self.clip.visual.transformer.resblocks[: last + 1]):
            if index == self.depth - 1:
                last_input = tokens
            tokens = block(tokens)
            if index in wanted:
                by_block[index] = tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, side_h, side_w)
        return [by_block[b] for b in blocks], last_input

    def encode_weighted_tokens(self, tokens: Tensor, weights: Tensor) -> Tensor:
        """Contrastive embeddings of weighted views of token sets, without another trunk pass.

        ``tokens``: P×(1+N)×C inputs of the last block (:meth:`block_features_and_tokens`);
        ``weights``: P×N non-negative weights of the patch tokens. A ViT-B/16 CLIP has no
        attentional pooler: its image embedding is the class token, which the last block's
        attention fills from the patch tokens. A view is that attention with the class token as
        query and only the patch tokens as keys and values, log(weight) added to its logits (a
        zero-weight token is ignored unless every weight of a view is zero; the gradient reaches
        the weights), followed by the attention's output projection, ``ln_post`` and ``proj``. The
        residual stream and the MLP are left out: they carry the class token's whole-image state
        from the earlier blocks into every view.
        """
        block = self.clip.visual.transformer.resblocks[-1]
        if weights.shape != (tokens.shape[0], tokens.shape[1] - 1):
            raise ValueError(f"weights {tuple(weights.shape)} must be P×N for tokens {tuple(tokens.shape)}")
        attn = block.attn
        heads, width = attn.num_heads, attn.embed_dim
        normed = block.ln_1(tokens)
        q_weight, k_weight, v_weight = attn.in_proj_weight.split(width)
        q_bias, k_bias, v_bias = attn.in_proj_bias.split(width)
        query = F.linear(normed[:, :1], q_weight, q_bias)  # P×1×E
        keys = F.linear(normed[:, 1:], k_weight, k_bias)  # P×N×E
        values = F.linear(normed[:, 1:], v_weight, v_bias)
        count, length = keys.shape[:2]
        query = query.view(count, 1, heads, -1).transpose(1, 2)  # P×h×1×d
        keys = keys.view(count, length, heads, -1).transpose(1, 2)  # P×h×N×d
        values = values.view(count, length, heads, -1).transpose(1, 2)
        logits = (query @ keys.transpose(-1, -2)) * (width // heads) ** -0.5  # P×h×1×N
        logits = logits + torch.log(weights.float().clamp_min(1e-6)).to(logits.dtype)[:, None, None, :]
        pooled = (logits.softmax(dim=-1) @ values).transpose(1, 2).reshape(count, width)
        pooled = attn.out_proj(pooled)
        return F.normalize(self.clip.visual.ln_post(pooled) @ self.clip.visual.proj, dim=-1)


def load_open_clip_student(checkpoint: str | None, name: str = "quiltnet", preset: str = "vit_b16",
                           image_size: int = 224) -> OpenClipStudent:
    """Frozen OpenCLIP student; ``checkpoint=None`` gives random weights drawn from the caller's torch RNG.

    ``checkpoint`` is the Hugging Face folder as downloaded or its weight file. The folder's
    ``open_clip_config.json``, when present, must describe the preset's architecture and the
    student's activation and normalisation; every key and shape of the weights must match, except
    that ``visual.positional_embedding`` is resampled to the ``image_size`` grid (bilinear, no
    antialiasing, class token kept), as the CONCH loader does.
    """
    if name not in SPECS:
        raise ConfigError(f"unknown OpenCLIP student {name!r}; choose one of {', '.join(SPECS)}")
    if checkpoint is None:
        return OpenClipStudent(name, preset, image_size)
    spec = SPECS[name]
    weights, config_file = _locate(Path(checkpoint), spec)
    if config_file is not None:
        _check_config(config_file, spec, preset)
    state = _read_state_dict(weights, spec)
    with torch.device("meta"):  # adopt the file's tensors instead of initialising and overwriting
        model = OpenClipStudent(name, preset, image_size)
    state = {k: v.float() for k, v in _fit_state_dict(state, model, weights).items()}
    model.clip.load_state_dict(state, strict=True, assign=True)
    model._set_buffers()
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise RuntimeError(f"{spec.title}: a tensor was left unmaterialised after loading")
    return model


def _locate(path: Path, spec: OpenClipSpec) -> tuple[Path, Path | None]:
    """The weight file and the ``open_clip_config.json`` beside it (None when absent)."""
    how = f"download the Hugging Face repo {spec.repo} into {spec.folder} (docs/students.md)"
    if path.is_dir():
        found = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
        if not found:
            if (path / "pytorch_model.bin").is_file():
                return path / "pytorch_model.bin", None  # let the key check name the file's model
            raise CheckpointError(f"{spec.title} weights not found: {path} holds none of {', '.join(WEIGHT_FILES)}; {how}")
        weights = found[0]
    elif path.is_file():
        weights = path
    else:
        raise CheckpointError(f"{spec.title} weights not found: {path}; {how}")
    config_file = weights.parent / CONFIG_FILE
    return weights, config_file if config_file.is_file() else None


def _check_config(path: Path, spec: OpenClipSpec, preset: str) -> None:
    """The folder's open_clip_config.json must describe the model these weights are loaded into."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        model_cfg = values["model_cfg"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not an open_clip_config.json ({type(exc).__name__}: {exc})") from None
    cfg = PRESETS[preset]
    expected: dict[str, Any] = {
        "embed_dim": EMBED_DIM,
        "vision_cfg.layers": cfg.layers, "vision_cfg.width": cfg.width, "vision_cfg.patch_size": PATCH_SIZE,
        "text_cfg.context_length": CONTEXT_LENGTH, "text_cfg.vocab_size": VOCAB_SIZE,
        "text_cfg.width": cfg.text_width, "text_cfg.heads": cfg.text_heads, "text_cfg.layers": cfg.text_layers,
    }
    for key, want in expected.items():
        section, _, field = key.rpartition(".")
        found = (model_cfg.get(section) or {}).get(field) if section else model_cfg.get(field)
        if found != want:
            raise CheckpointError(f"{path}: model_cfg.{key} is {found}, {spec.title} (preset {preset}) has {want}")
    # Only a stated activation can contradict the student: older OpenAI CLIP folders leave it out.
    quick_gelu = model_cfg.get("quick_gelu")
    if quick_gelu is not None and bool(quick_gelu) != spec.quick_gelu:
        other = next(n for n, s in SPECS.items() if s.quick_gelu == bool(quick_gelu))
        raise CheckpointError(f"{path}: a {'QuickGELU' if quick_gelu else 'GELU'} model ({SPECS[other].title}), "
                              f"not {spec.title}: set model.student.name: {other}")
    preprocess = values.get("preprocess_cfg") or {}
    for key, want in (("mean", CLIP_MEAN), ("std", CLIP_STD)):
        found = preprocess.get(key)
        if found is not None and not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(found, want)):
            raise CheckpointError(f"{path}: preprocess_cfg.{key} is {found}, {spec.title} normalises with {list(want)}")


def _read_state_dict(path: Path, spec: OpenClipSpec) -> dict[str, Tensor]:
    state = read_weight_file(path, f"{spec.title} weights")
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{spec.title} weights {path} are not a plain state dict (name → tensor)")
    if weight_file_kind(state) == CONCH_FILE:
        raise CheckpointError(f"{spec.title} weights {path} are a CONCH file: set model.student.name: conch and "
                              f"model.conch.checkpoint: {path}, or give the {spec.title} folder ({spec.folder})")
    return dict(state)


def _fit_state_dict(state: dict[str, Tensor], model: OpenClipStudent, source: Path) -> dict[str, Tensor]:
    """Resample the position embedding to the model's grid and reject any other mismatch."""
    expected = model.clip.state_dict()
    pos, target = state.get(POS_EMBED_KEY), expected[POS_EMBED_KEY]
    if pos is not None and pos.ndim == 2 and pos.shape != target.shape and pos.shape[1] == target.shape[1]:
        side = math.isqrt(pos.shape[0] - 1)
        if side * side == pos.shape[0] - 1:
            state[POS_EMBED_KEY] = resample_abs_pos_embed(
                pos[None], new_size=list(model.clip.visual.grid_size), old_size=[side, side], num_prefix_tokens=1,
                interpolation="bilinear", antialias=False)[0]
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshaped = [f"{k} {list(state[k].shape)} (model {list(expected[k].shape)})"
                 for k in sorted(expected.keys() & state.keys()) if state[k].shape != expected[k].shape]
    problems = [f"{label}: {_key_list(keys)}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)) if keys]
    if problems:
        raise CheckpointError(f"{model.spec.title} weights {source} do not fit preset {model.preset!r}: " + "; ".join(problems))
    return state


def _key_list(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


@lru_cache(maxsize=1)
def _tokenizer() -> SimpleTokenizer:
    # open_clip's wheel ships the CLIP BPE vocabulary; nothing is downloaded
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=CONTEXT_LENGTH)
