"""The premises of L_sim and L_struct, measured on held-out synthetic tiles.

- CONCH knows the classes: zero-shot accuracy on class-pure tiles with the four prototype prompts.
- L_sim's premise: the FG view of a class (the tile with everything else blacked out) embeds
  closer to that class's prompt than the BG view (the class blacked out): cos(FG) − cos(BG).
- L_struct's premise: the teacher's token affinities are higher within a ground-truth region than
  across regions: (mean cosine within − mean cosine across) / std of all cosines, against a
  random teacher.

Held-out tiles come from generator seeds that neither pretraining nor the BCSS-format splits use.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from construct.data.datasets import to_tensor
from construct.data.synthetic import STYLES, TEXTURE_NAMES, make_tile, paint
from construct.losses.structural import affinity
from construct.models.conch import ConchModel, load_conch, tokenize
from construct.models.segformer import MiTTeacher, mit_config
from construct.tools.testbed.seeds import HELD_OUT_MIXED_TAG, HELD_OUT_PURE_TAG, tagged_rng

STYLE_OFFSET = {"default": 0, "variant": 500_000}


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.pstdev(values), 4), "n": len(values)}


def pure_tiles(seed: int, style: str = "default", per_class: int = 12, size: int = 224) -> list[torch.Tensor]:
    """Class-pure held-out tiles: one per_class×3×size×size batch per tissue class."""
    return [torch.stack([to_tensor(paint(tagged_rng(seed, HELD_OUT_PURE_TAG, STYLE_OFFSET[style] + cls * 1000 + i),
                                          np.full((size, size), cls, np.uint8), STYLES[style]))
                         for i in range(per_class)]) for cls in range(len(TEXTURE_NAMES))]


@torch.no_grad()
def zero_shot_accuracy(conch: ConchModel, prompts: Sequence[str], tiles: Sequence[torch.Tensor]) -> float:
    """Share of class-pure tiles (``tiles[c]``: class c) closest to their own class's prompt."""
    text = conch.encode_text(tokenize(prompts))
    correct = sum(int((conch.encode_image(batch) @ text.t()).argmax(1).eq(cls).sum()) for cls, batch in enumerate(tiles))
    return correct / sum(len(batch) for batch in tiles)


def held_out_tiles(seed: int, count: int, style: str = "default") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mixed tiles (image 3×224×224 in [0, 1], mask 224×224) no other code path draws."""
    tiles = []
    for i in range(count):
        image, mask = make_tile(tagged_rng(seed, HELD_OUT_MIXED_TAG, STYLE_OFFSET[style] + i), 224, STYLES[style])
        tiles.append((to_tensor(image), torch.from_numpy(mask.astype(np.int64))))
    return tiles


@torch.no_grad()
def fg_bg_gaps(conch: ConchModel, prompts: Sequence[str], tiles: Sequence[tuple[torch.Tensor, torch.Tensor]],
               min_area: float = 0.05) -> list[float]:
    """cos(FG view, own prompt) − cos(BG view, own prompt) for every (tile, present tissue class)."""
    text = conch.encode_text(tokenize(prompts))
    gaps = []
    for image, mask in tiles:
        for cls in range(len(TEXTURE_NAMES)):
            inside = (mask == cls).float()
            if inside.mean() < min_area or inside.mean() > 1 - min_area:
                continue
            views = torch.stack([image * inside, image * (1 - inside)])
            fg, bg = conch.encode_image(views) @ text[cls]
            gaps.append(float(fg - bg))
    return gaps


@torch.no_grad()
def affinity_contrasts(teacher: MiTTeacher, tiles: Sequence[tuple[torch.Tensor, torch.Tensor]], stage: int) -> list[float]:
    """Per tile with ≥ 2 regions: (mean token affinity within regions − across regions) / std of all
    affinities, at one teacher stage."""
    contrasts = []
    for image, mask in tiles:
        features = teacher(image[None])[stage]
        grid = features.shape[-2:]
        # each token's region: the majority class of the pixels it covers
        share = F.adaptive_avg_pool2d(F.one_hot(mask, 5).permute(2, 0, 1)[None].float(), grid)
        region = share.argmax(1).flatten()
        if region.unique().numel() < 2:
            continue
        same = region[:, None] == region[None, :]
        off_diagonal = ~torch.eye(region.numel(), dtype=torch.bool)
        scores = affinity(features)[0]
        # In units of the spread of all affinities: a random network's cosines sit in a narrow band.
        spread = scores[off_diagonal].std().clamp_min(1e-6)
        contrasts.append(float((scores[same & off_diagonal].mean() - scores[~same].mean()) / spread))
    return contrasts


def measure_premises(conch: ConchModel, teacher: MiTTeacher, seed: int, prompts: Sequence[str],
                     tiles: int = 16) -> dict[str, Any]:
    """Every premise number, for the pretrained towers and for random towers of the same seed."""
    torch.manual_seed(seed)
    random_conch = load_conch(None, image_size=224, preset="tiny")
    torch.manual_seed(seed)
    random_teacher = MiTTeacher(mit_config("tiny"))
    held_out = held_out_tiles(seed, tiles)
    variant = held_out_tiles(seed, tiles, "variant")
    pure = {style: pure_tiles(seed, style, per_class=tiles) for style in ("default", "variant")}
    result: dict[str, Any] = {}
    for name, tower in (("pretrained", conch), ("random", random_conch)):
        result[f"zero_shot_accuracy_{name}"] = {style: round(zero_shot_accuracy(tower, prompts, pure[style]), 4)
                                                for style in ("default", "variant")}
        result[f"fg_bg_cosine_gap_{name}"] = {"default": _mean_std(fg_bg_gaps(tower, prompts, held_out)),
                                             "variant": _mean_std(fg_bg_gaps(tower, prompts, variant))}
    for name, tower in (("pretrained", teacher), ("random", random_teacher)):
        result[f"teacher_affinity_contrast_{name}"] = {f"stage{stage}": _mean_std(affinity_contrasts(tower, held_out, stage))
                                                       for stage in (2, 3)}
    return result


def format_premises(premises: dict[str, Any]) -> str:
    """The premise numbers as printed lines."""
    lines = []
    for name in ("pretrained", "random"):
        zs = premises[f"zero_shot_accuracy_{name}"]
        gap = premises[f"fg_bg_cosine_gap_{name}"]
        lines.append(f"  CONCH {name:>10}: zero-shot accuracy {100 * zs['default']:.1f}% (variant style "
                     f"{100 * zs['variant']:.1f}%); cos(FG view, prompt) − cos(BG view, prompt) "
                     f"{gap['default']['mean']:+.3f} ± {gap['default']['std']:.3f} (variant {gap['variant']['mean']:+.3f})")
    for name in ("pretrained", "random"):
        aff = premises[f"teacher_affinity_contrast_{name}"]
        lines.append(f"  MiT   {name:>10}: token affinity (within − across regions) / spread: stage 2 "
                     f"{aff['stage2']['mean']:+.3f} ± {aff['stage2']['std']:.3f}, stage 3 "
                     f"{aff['stage3']['mean']:+.3f} ± {aff['stage3']['std']:.3f}")
    return "\n".join(lines)
