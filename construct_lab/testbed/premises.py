"""The premises of L_sim and L_struct, measured on held-out synthetic tiles.

- CONCH knows the classes: zero-shot accuracy on class-pure tiles with the four prototype prompts.
- L_sim's premise: the FG view of a class (the tile with everything else blacked out) embeds
  closer to that class's prompt than the BG view (the class blacked out): cos(FG) − cos(BG).
- L_struct's premise: the teacher's token affinities are higher within a ground-truth region than
  across regions: (mean cosine within − mean cosine across) / std of all cosines, against a
  random teacher.

Held-out tiles come from generator seeds that neither pretraining nor the BCSS-format splits use.
Each premise is measured on every evaluation set (:data:`EVAL_SETS`: each painter with its own
palette, and the classic painter in the ``variant`` style); a set whose painter pretraining left
out measures transfer to tissue drawn another way.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from construct.data.datasets import to_tensor
from construct.losses.structural import affinity
from construct.models.conch import ConchModel, load_conch, tokenize
from construct.models.segformer import MiTTeacher, mit_config
from construct_lab.synthetic.tiles import PAINTERS, STYLES, TEXTURE_NAMES, Style, make_tile, paint
from construct_lab.testbed.seeds import HELD_OUT_MIXED_TAG, HELD_OUT_PURE_TAG, tagged_rng

EVAL_SETS: dict[str, tuple[str, str]] = {**{name: (name, "default") for name in PAINTERS}, "classic-variant": ("classic", "variant")}
"""Evaluation sets of the premises: name -> (painter, style; 'default' = the painter's own palette)."""


def _set_offset(name: str) -> int:
    return 500_000 * list(EVAL_SETS).index(name)


def _set_style(name: str) -> tuple[str, Style | None]:
    painter, style = EVAL_SETS[name]
    return painter, None if style == "default" else STYLES[style]


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.pstdev(values), 4), "n": len(values)}


def pure_tiles(seed: int, eval_set: str = "classic", per_class: int = 12, size: int = 224) -> list[torch.Tensor]:
    """Class-pure held-out tiles of one evaluation set: one per_class×3×size×size batch per tissue class."""
    painter, style = _set_style(eval_set)
    return [torch.stack([to_tensor(paint(tagged_rng(seed, HELD_OUT_PURE_TAG, _set_offset(eval_set) + cls * 1000 + i),
                                          np.full((size, size), cls, np.uint8), style, painter))
                         for i in range(per_class)]) for cls in range(len(TEXTURE_NAMES))]


@torch.no_grad()
def zero_shot_accuracy(conch: ConchModel, prompts: Sequence[str], tiles: Sequence[torch.Tensor]) -> float:
    """Share of class-pure tiles (``tiles[c]``: class c) closest to their own class's prompt."""
    text = conch.encode_text(tokenize(prompts))
    correct = sum(int((conch.encode_image(batch) @ text.t()).argmax(1).eq(cls).sum()) for cls, batch in enumerate(tiles))
    return correct / sum(len(batch) for batch in tiles)


def held_out_tiles(seed: int, count: int, eval_set: str = "classic") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mixed tiles (image 3×224×224 in [0, 1], mask 224×224) of one evaluation set, which no other code path draws."""
    painter, style = _set_style(eval_set)
    tiles = []
    for i in range(count):
        image, mask = make_tile(tagged_rng(seed, HELD_OUT_MIXED_TAG, _set_offset(eval_set) + i), 224, style, painter=painter)
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
                     tiles: int = 16, pretrained_on: Sequence[str] = tuple(PAINTERS)) -> dict[str, Any]:
    """Every premise number on every evaluation set, for the pretrained towers and for random towers
    of the same seed; ``pretrained_on`` (the painters pretraining used) is recorded beside them."""
    torch.manual_seed(seed)
    random_conch = load_conch(None, image_size=224, preset="tiny")
    torch.manual_seed(seed)
    random_teacher = MiTTeacher(mit_config("tiny"))
    mixed = {name: held_out_tiles(seed, tiles, name) for name in EVAL_SETS}
    pure = {name: pure_tiles(seed, name, per_class=tiles) for name in EVAL_SETS}
    result: dict[str, Any] = {"pretrained_on": list(pretrained_on)}
    for name, tower in (("pretrained", conch), ("random", random_conch)):
        result[f"zero_shot_accuracy_{name}"] = {s: round(zero_shot_accuracy(tower, prompts, pure[s]), 4) for s in EVAL_SETS}
        result[f"fg_bg_cosine_gap_{name}"] = {s: _mean_std(fg_bg_gaps(tower, prompts, mixed[s])) for s in EVAL_SETS}
    for name, tower in (("pretrained", teacher), ("random", random_teacher)):
        result[f"teacher_affinity_contrast_{name}"] = {
            s: {f"stage{stage}": _mean_std(affinity_contrasts(tower, mixed[s], stage)) for stage in (2, 3)}
            for s in EVAL_SETS}
    return result


def format_premises(premises: dict[str, Any]) -> str:
    """The premise numbers as printed lines, one per evaluation set (held-out painters marked)."""
    lines = [f"  pretrained on painters: {', '.join(premises['pretrained_on'])}"]
    for eval_set, (painter, _) in EVAL_SETS.items():
        held_out = "" if painter in premises["pretrained_on"] else "  [painter held out of pretraining]"
        lines.append(f"  {eval_set}:{held_out}")
        for name in ("pretrained", "random"):
            gap = premises[f"fg_bg_cosine_gap_{name}"][eval_set]
            aff = premises[f"teacher_affinity_contrast_{name}"][eval_set]
            lines.append(f"    {name:>10}: CONCH zero-shot {100 * premises[f'zero_shot_accuracy_{name}'][eval_set]:5.1f}%, "
                         f"cos(FG view) − cos(BG view) {gap['mean']:+.3f} ± {gap['std']:.3f}; MiT affinity contrast "
                         f"stage 2 {aff['stage2']['mean']:+.2f}, stage 3 {aff['stage3']['mean']:+.2f}")
    return "\n".join(lines)
