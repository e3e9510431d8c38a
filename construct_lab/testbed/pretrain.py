"""Pretrain the tiny towers of the testbed and save them in the layout of the real weight files.

- Tiny CONCH (image tower: trunk, contrastive attentional pooler, projection; and text tower):
  a CLIP-style symmetric contrastive loss on synthetic image–caption pairs: class-pure crops and
  crops of mixed tiles (sometimes with one class region blacked out, as L_sim's views are), with
  captions drawn from varied templates and paraphrases and, for class-pure crops, the prototype
  prompts themselves, tokenised by the real CONCH tokenizer. Pairs whose captions name the same
  classes are all positives of each other (with only five classes, most of a batch would
  otherwise be false negatives). Saved as ``pytorch_model.bin`` with the official keys
  (``visual.*``, ``text.*``, ``logit_scale``).
- Tiny MiT: dense texture-family labelling of random-colour images (construct_lab.testbed.textures),
  a task that shares nothing with the four tissue classes, as ImageNet shares nothing with BCSS.
  Saved as a Hugging Face folder (``config.json`` + ``model.safetensors``).

Every image is drawn with generator seeds tagged apart from the BCSS-format splits (tags 0–2), so
pretraining never sees a train, validation or test tile. CONCH's images come from several
painters (construct_lab.synthetic.tiles.PAINTERS: structurally different ways of drawing the same
classes; ``Budget.painters`` picks them, so one can be held out), each tile with its palette and
structure size randomised, and stain, scale and flip augmentation on top: the towers should learn
the classes, not one painter. The files are built in a hidden folder and renamed into place
with a manifest; a later call with the same seed and budget reuses them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from construct.data.datasets import to_tensor
from construct.errors import ConfigError
from construct.models.conch import ConchModel, load_conch, tokenize
from construct.models.segformer import MiTTeacher, mit_config
from construct_lab.synthetic.tiles import GLASS, PAINTERS, TEXTURE_NAMES, Style, make_tile, paint
from construct_lab.testbed.augment import stain_jitter
from construct_lab.testbed.captions import caption
from construct_lab.testbed.premises import measure_premises
from construct_lab.testbed.seeds import MIXED_TAG, PURE_TAG, TEXTURE_TAG, tagged_rng
from construct_lab.testbed.textures import FAMILIES, HUE_BANDS, make_texture_image

VERSION = 2  # 2: several painters, per-tile palette and scale randomisation, stronger stain jitter
CONCH_FILE = "pytorch_model.bin"
TEACHER_FOLDER = "mit"
MANIFEST = "testbed.json"
PURE_SIZE = 144
"""Class-pure crops are drawn larger than the training crop so that scale augmentation can zoom out."""
MIN_AREA = 0.08
"""A class is named in a mixed crop's caption when it covers at least this fraction of it."""
BLACKOUT_RATE = 0.35
"""Share of mixed crops with one tissue region blacked out (the kind of view L_sim embeds)."""


@dataclass(frozen=True)
class Budget:
    """How much pretraining; the defaults fit in about a minute and a half on 2 CPU cores."""

    conch_steps: int = 100
    conch_batch: int = 40
    conch_size: int = 112
    pure_per_class: int = 60
    """Class-pure crops per class, shared out over the painters."""
    mixed_tiles: int = 150
    """Mixed tiles, shared out over the painters."""
    teacher_steps: int = 100
    teacher_batch: int = 16
    teacher_size: int = 128
    lr: float = 1e-3
    held_out: int = 16
    """Held-out tiles per premise measurement (mixed tiles; class-pure tiles per class)."""
    painters: str = ",".join(PAINTERS)
    """Comma-separated painters (construct_lab.synthetic.tiles.PAINTERS) whose tissue CONCH is pretrained
    on; leave one out to measure transfer to tissue drawn another way."""
    stain: float = 0.35
    """Strength of the stain jitter (construct_lab.testbed.augment.stain_jitter)."""

    def painter_names(self) -> list[str]:
        names = [name.strip() for name in self.painters.split(",") if name.strip()]
        unknown = [name for name in names if name not in PAINTERS]
        if not names or unknown:
            raise ConfigError(f"budget painters: expected a comma-separated subset of {', '.join(PAINTERS)}, "
                              f"got '{self.painters}'")
        return names


def tower_paths(folder: str | Path) -> tuple[Path, Path]:
    """(CONCH weight file, MiT Hugging Face folder) of a testbed folder."""
    folder = Path(folder)
    return folder / CONCH_FILE, folder / TEACHER_FOLDER


def _cosine_schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, step: int, total: int, name: str, started: float,
          log: Callable[[str], None]) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if step % 25 == 0 or step == total - 1:
        log(f"  {name} step {step + 1}/{total}  loss {loss.item():.3f}  ({time.perf_counter() - started:.0f} s)")


def randomised_style(rng: np.random.Generator, palette: Style) -> Style:
    """A painter's palette with another lab's look: one random stain gain per channel for the
    whole tile, every colour nudged on its own, and the structures 0.75–1.3× their size."""
    gain = 1.0 + rng.normal(0.0, 0.06, 3)
    colours = {f.name: tuple(float(v) for v in np.clip(palette.colour(f.name) * gain + rng.normal(0.0, 8.0, 3), 0, 255))
               for f in fields(Style) if f.name != "scale"}
    return Style(**colours, scale=palette.scale * float(rng.uniform(0.75, 1.3)))


class CaptionedImages:
    """A pool of class-pure crops and mixed tiles, sampled into augmented image–caption batches."""

    def __init__(self, seed: int, budget: Budget, prompts: Sequence[str]) -> None:
        self.prompts = list(prompts)
        self.budget = budget
        painters = budget.painter_names()
        # Tile i of a pool is drawn by painter i mod n, each with its own randomised palette and scale.
        self.pure: list[list[torch.Tensor]] = [[] for _ in range(len(TEXTURE_NAMES) + 1)]
        for c in range(len(TEXTURE_NAMES) + 1):
            for i in range(budget.pure_per_class):
                rng = tagged_rng(seed, PURE_TAG, c * 10_000 + i)
                painter = painters[i % len(painters)]
                style = randomised_style(rng, PAINTERS[painter].palette)
                mask = np.full((PURE_SIZE, PURE_SIZE), c, np.uint8)
                self.pure[c].append(to_tensor(paint(rng, mask, style, painter)))
        self.mixed = []
        for i in range(budget.mixed_tiles):
            rng = tagged_rng(seed, MIXED_TAG, i)
            painter = painters[i % len(painters)]
            image, mask = make_tile(rng, 224, randomised_style(rng, PAINTERS[painter].palette), painter=painter)
            self.mixed.append((to_tensor(image), torch.from_numpy(mask.astype(np.int64))))
        self.rng = np.random.default_rng([seed, 99])
        self.generator = torch.Generator().manual_seed(seed)

    def _crop(self, side: int) -> tuple[torch.Tensor, tuple[int, ...]]:
        """A side×side crop at native scale: class-pure or from a mixed tile (half each), with its classes."""
        if self.rng.random() < 0.5:
            # Background is easy and is not a prototype class: it is drawn less often.
            cls = int(self.rng.choice(len(TEXTURE_NAMES) + 1, p=[0.225] * len(TEXTURE_NAMES) + [0.1]))
            source = self.pure[cls][int(self.rng.integers(len(self.pure[cls])))]
            top, left = self.rng.integers(0, PURE_SIZE - side + 1, 2)
            return source[:, top:top + side, left:left + side], (cls,)
        image, mask = self.mixed[int(self.rng.integers(len(self.mixed)))]
        top, left = self.rng.integers(0, image.shape[-1] - side + 1, 2)
        crop, mask = image[:, top:top + side, left:left + side], mask[top:top + side, left:left + side]
        area = torch.bincount(mask.flatten(), minlength=GLASS + 1).float() / mask.numel()
        present = [c for c in range(GLASS + 1) if area[c] >= MIN_AREA] or [int(area.argmax())]
        tissue = [c for c in present if c != GLASS]
        if len(tissue) >= 2 and self.rng.random() < BLACKOUT_RATE:
            hidden = int(self.rng.choice(tissue))
            crop = crop * (mask != hidden)
            present.remove(hidden)
        return crop, tuple(present)

    def batch(self) -> tuple[torch.Tensor, list[tuple[int, ...]], list[str]]:
        """B augmented images (one random magnification per batch), their class sets and a caption each."""
        size = self.budget.conch_size
        side = min(PURE_SIZE, round(size / self.rng.uniform(0.7, 1.4)))
        images, classes = [], []
        for _ in range(self.budget.conch_batch):
            crop, present = self._crop(side)
            if self.rng.random() < 0.5:
                crop = crop.flip(-1)
            images.append(crop.rot90(int(self.rng.integers(4)), dims=(-2, -1)))
            classes.append(present)
        batch = F.interpolate(torch.stack(images), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        captions = [caption(self.rng, present, self.prompts) for present in classes]
        return stain_jitter(batch, self.generator, self.budget.stain), classes, captions


def symmetric_multi_positive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, positive: torch.Tensor,
                                  logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy with every same-class pair as a positive.

    ``positive`` is B×T boolean (image i and caption j name the same classes); each caption is
    one image's own, so every column has a positive; images whose classes no caption names
    only enter the text→image direction.
    """
    logits = logit_scale.exp().clamp(max=100.0) * image_emb @ text_emb.t()
    target = positive.float()
    rows = target.sum(1) > 0
    image_to_text = -(F.log_softmax(logits[rows], dim=1) * target[rows] / target[rows].sum(1, keepdim=True)).sum(1).mean()
    text_to_image = -(F.log_softmax(logits, dim=0) * target / target.sum(0, keepdim=True)).sum(0).mean()
    return 0.5 * (image_to_text + text_to_image)


def pretrain_conch(seed: int, budget: Budget, prompts: Sequence[str],
                   log: Callable[[str], None] = print) -> ConchModel:
    """Train the tiny CONCH's image and text towers together; returns it frozen, as loaders do."""
    torch.manual_seed(seed)
    conch = load_conch(None, image_size=224, preset="tiny")
    started = time.perf_counter()
    data = CaptionedImages(seed, budget, prompts)
    log(f"  drew {budget.pure_per_class * (len(TEXTURE_NAMES) + 1)} class-pure crops and {budget.mixed_tiles} mixed tiles "
        f"({time.perf_counter() - started:.0f} s)")
    token_cache: dict[str, torch.Tensor] = {}
    trained = [p for name, p in conch.named_parameters() if not name.startswith("visual.attn_pool_caption")
               and not name.startswith("visual.ln_caption")]
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=budget.lr, weight_decay=0.05)
    warmup = max(1, budget.conch_steps // 10)
    for step in range(budget.conch_steps):
        for group in optimizer.param_groups:
            group["lr"] = budget.lr * _cosine_schedule(step, budget.conch_steps, warmup)
        images, classes, captions = data.batch()
        # Half the captions are encoded: the text tower's 128-token context costs as much as the images.
        texts = captions[: max(1, len(captions) // 2)]
        missing = [t for t in dict.fromkeys(texts) if t not in token_cache]
        if missing:
            token_cache.update(zip(missing, tokenize(missing)))
        ids = torch.stack([token_cache[t] for t in texts])
        keys = [tuple(sorted(c)) for c in classes]
        positive = torch.tensor([[a == b for b in keys[: len(texts)]] for a in keys])
        loss = symmetric_multi_positive_loss(conch.encode_image(images), conch.encode_text(ids), positive,
                                             conch.logit_scale)
        _step(optimizer, loss, step, budget.conch_steps, "CONCH", started, log)
    conch.requires_grad_(False)
    return conch


class _TextureHead(nn.Module):
    """Per-pixel texture-family and hue-band logits from MiT stages 1–3 (stride 8), used only in pretraining."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Conv2d(c, len(FAMILIES) + HUE_BANDS, 1) for c in channels[1:])

    def forward(self, stages: Sequence[torch.Tensor]) -> torch.Tensor:
        size = stages[1].shape[-2:]
        return sum(F.interpolate(head(x), size=size, mode="bilinear", align_corners=False)
                   for head, x in zip(self.heads, stages[1:]))


def pretrain_teacher(seed: int, budget: Budget, log: Callable[[str], None] = print) -> MiTTeacher:
    """Train the tiny MiT encoder on dense texture-family labelling; returns it frozen."""
    torch.manual_seed(seed)
    teacher = MiTTeacher(mit_config("tiny"))
    encoder = teacher.segformer.encoder
    head = _TextureHead(teacher.stage_channels)
    encoder.requires_grad_(True)
    parameters = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=budget.lr * 2, weight_decay=0.01)
    warmup = max(1, budget.teacher_steps // 10)
    started = time.perf_counter()
    for step in range(budget.teacher_steps):
        for group in optimizer.param_groups:
            group["lr"] = budget.lr * 2 * _cosine_schedule(step, budget.teacher_steps, warmup)
        drawn = [make_texture_image(tagged_rng(seed, TEXTURE_TAG, step * budget.teacher_batch + i), budget.teacher_size)
                 for i in range(budget.teacher_batch)]
        images = torch.stack([to_tensor(image) for image, _, _ in drawn])
        labels = torch.stack([torch.from_numpy(np.stack([family, hue])) for _, family, hue in drawn])
        stages = encoder((images - teacher.mean) / teacher.std, output_hidden_states=True, return_dict=True).hidden_states
        logits = head(stages)
        labels = F.interpolate(labels.float(), size=logits.shape[-2:], mode="nearest").long()
        loss = (F.cross_entropy(logits[:, : len(FAMILIES)], labels[:, 0])
                + F.cross_entropy(logits[:, len(FAMILIES):], labels[:, 1]))
        _step(optimizer, loss, step, budget.teacher_steps, "MiT", started, log)
    teacher.requires_grad_(False)
    return teacher


def _manifest(seed: int, budget: Budget, prompts: Sequence[str]) -> dict[str, Any]:
    return {"generator": "construct_lab.testbed", "version": VERSION, "seed": seed, "budget": asdict(budget),
            "prompts": list(prompts)}


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _mismatch(found: dict[str, Any] | None, wanted: dict[str, Any]) -> str:
    """What the testbed in a folder differs in from the one a config asks for, in a few words."""
    if found is None:
        return f"holds files but no testbed manifest ({MANIFEST})"
    differing = [key for key in wanted if found.get(key) != wanted[key]]
    if "prompts" in differing:
        there, here = list(found.get("prompts") or []), list(wanted["prompts"])
        first = next(i for i in range(max(len(there), len(here))) if i >= len(there) or i >= len(here)
                     or there[i] != here[i])
        shown = [_short(prompts[first]) if first < len(prompts) else "none" for prompts in (here, there)]
        return (f"holds tiny towers pretrained for other class prompts (prompt {first + 1}: {shown[0]} in this "
                f"config, {shown[1]} there); the tiny CONCH knows only the prompts it was pretrained on")
    if differing:
        return f"holds tiny towers of another {', '.join(differing)}"
    return "holds a testbed manifest but not both towers"


def _short(text: str, limit: int = 48) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def ensure_testbed(folder: str | Path, seed: int, prompts: Sequence[str], budget: Budget = Budget(),
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Pretrain both towers into ``folder`` unless it already holds them for this seed and budget.

    Returns the manifest, which records what was trained and the premise measurements. A folder
    holding anything else is refused rather than overwritten.
    """
    folder = Path(folder)
    wanted = _manifest(seed, budget, prompts)
    found = read_manifest(folder)
    conch_file, teacher_folder = tower_paths(folder)
    if found is not None and {k: found.get(k) for k in wanted} == wanted and conch_file.is_file() and teacher_folder.is_dir():
        log(f"{folder}: pretrained tiny towers found (seed {seed}); reusing them")
        return found
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"{folder}: {_mismatch(found, wanted)}; the towers there are kept: point "
                          "model.conch.checkpoint and model.teacher.checkpoint at another folder (e.g. "
                          f"{folder.parent / 'mine'}/pytorch_model.bin and {folder.parent / 'mine'}/mit) to pretrain towers for this "
                          "config there on first use")
    log(f"pretraining the tiny CONCH and tiny MiT into {folder} (seed {seed}) ...")
    started = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
    try:
        staging.chmod(0o755)
        # Pretraining seeds torch's global generator; the caller's random stream must not depend
        # on whether the towers were cached or made now.
        with torch.random.fork_rng(devices=[]):
            conch = pretrain_conch(seed, budget, prompts, log)
            teacher = pretrain_teacher(seed, budget, log)
        stage_conch, stage_teacher = tower_paths(staging)
        state = {k: v.detach().clone() for k, v in conch.state_dict().items()}
        torch.save(state, stage_conch)
        teacher.segformer.save_pretrained(stage_teacher, safe_serialization=True)
        wanted["seconds"] = round(time.perf_counter() - started, 1)
        with torch.random.fork_rng(devices=[]):
            wanted["premises"] = measure_premises(conch, teacher, seed, prompts, budget.held_out,
                                                   budget.painter_names())
        (staging / MANIFEST).write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
        if folder.exists():
            folder.rmdir()  # empty, checked above
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"pretrained in {wanted['seconds']:.0f} s (premises measured in the manifest {folder / MANIFEST})")
    return wanted
