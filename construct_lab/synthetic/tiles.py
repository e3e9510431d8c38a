"""Synthetic tile datasets for demos and tests (no real slides needed), in the layout of a dataset preset.

The ``classic`` painter is described here; construct_lab.synthetic.painters holds others that draw the
same textures another way (``--painter``), for testing transfer to tissue a model never saw.

Each tile hides a texture mask made of 1–4 tissue regions (warped Voronoi cells, so regions are
large with wavy borders) and sometimes a background region. Every class has its own H&E-like
colour and texture, distinct at the scale of a 16-px ViT patch:

- TUM: large purple, slightly elongated nuclei packed on pinkish-purple cytoplasm;
- STR: pink collagen fibres (oriented wavy streaks) with sparse spindle nuclei;
- LYM: small, dark, round nuclei packed densely;
- NEC: pale eosinophilic blotches with scattered nuclear debris and faint "ghost" cells;
- BACK: near-white.

Each class of the dataset is drawn with one of the four tissue textures (:class:`Layout`; by
default class i gets texture i, so BCSS-WSSS's TUM/STR/LYM/NEC get the textures above), and
masks are written in the dataset's mask values and palette. A :class:`Layout` also sets how train
labels are written (``[1101]``, ``[1 1 0 1]`` or a CSV), the validation folder's name, and white
alveolar holes inside tissue (labelled background, as in LUAD-HistoSeg).

Train tiles are labelled with the tissue classes present in their hidden mask. Each tile is
drawn from its own numpy Generator seeded by (seed, split, index), so a tile does not depend
on the other splits' sizes. The dataset is built in a hidden sibling folder and renamed into
place at the end, so an interrupted run never leaves a half-made dataset at ``out``.

    python -m construct_lab.synthetic.tiles --out data/synthetic --train 1000 --val 200 --test 200 --seed 0 \
        [--dataset configs/datasets/luad_histoseg.yaml --spaced-labels --val-folder valid --alveoli]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from construct.classes import ClassSet
from construct.data.io import write_image, write_mask
from construct.errors import ConStructError, DataError
from construct_lab.paths import REPO
from construct_lab.synthetic.fields import GLASS, STYLES, Painter, Style, cover, mix, nuclei_edge, smooth_noise
from construct_lab.synthetic.painters import PAINTERS as EXTRA_PAINTERS

MANIFEST = "synthetic.json"
_VERSION = 1  # bump when the images change, so an old dataset no longer counts as complete
_SPLITS = ("train", "val", "test")
_SLIDE_GRID = 8  # 8×8 tiles per fake slide, only for plausible file names
_TILES_PER_SLIDE = _SLIDE_GRID**2
TEXTURE_NAMES = ("tumour", "stroma", "lymphocytes", "necrosis")
"""The generator's tissue textures, by texture index; index 4 (GLASS) is glass (background)."""
DEFAULT_DATASET = REPO / "configs" / "datasets" / "bcss_wsss.yaml"

def _tumour(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int, style: Style) -> np.ndarray:
    k = style.scale
    mottle = smooth_noise(rng, size, 4.0 * k)[y, x]
    cyto = style.colour("tum_cyto") * (1.0 + 0.04 * mottle[:, None])
    nuc = cover(nuclei_edge(rng, y, x, cell=13.0 * k, radius=(3.8 * k, 5.8 * k), aspect=(1.0, 1.5), keep=0.85))
    chromatin = style.colour("tum_nuc") * (1.0 + 0.10 * rng.standard_normal(y.shape, dtype=np.float32))[:, None]
    return mix(cyto, chromatin, nuc)


def _stroma(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int, style: Style) -> np.ndarray:
    k = style.scale
    angle = rng.uniform(0, np.pi)
    along = x * np.cos(angle) + y * np.sin(angle)
    across = y * np.cos(angle) - x * np.sin(angle)
    # Parallel streaks whose phase wanders smoothly: wavy collagen bundles.
    phase = 2.0 * np.pi * across / (k * rng.uniform(6.0, 9.0)) + 3.0 * smooth_noise(rng, size, 14.0 * k)[y, x]
    fibre = (0.5 + 0.5 * np.sin(phase)) ** 1.5
    fibre *= 0.75 + 0.25 * np.sin(2.0 * np.pi * along / (40.0 * k) + smooth_noise(rng, size, 10.0 * k)[y, x])
    colour = mix(style.colour("str_base"), style.colour("str_fibre"), fibre)
    spindle = cover(
        nuclei_edge(rng, y, x, cell=24.0 * k, radius=(2.0 * k, 2.6 * k), aspect=(2.5, 3.2), keep=0.35, angle=angle)
    )
    return mix(colour, style.colour("nuc_spindle"), spindle)


def _lymphocytes(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int, style: Style) -> np.ndarray:
    k = style.scale
    nuc = cover(nuclei_edge(rng, y, x, cell=6.0 * k, radius=(2.2 * k, 2.7 * k), keep=0.95))
    dark = style.colour("lym_nuc") * (1.0 + 0.12 * rng.standard_normal(y.shape, dtype=np.float32))[:, None]
    return mix(np.broadcast_to(style.colour("lym_base"), (y.size, 3)), dark, nuc)


def _necrosis(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int, style: Style) -> np.ndarray:
    k = style.scale
    blotch = smooth_noise(rng, size, 8.0 * k)[y, x]
    colour = style.colour("nec_base") * (1.0 + 0.04 * blotch[:, None])
    # Ghost cells: only the faint outline of dead cells is left.
    ghost = nuclei_edge(rng, y, x, cell=16.0 * k, radius=(4.0 * k, 6.0 * k), keep=0.4)
    colour = mix(colour, style.colour("nec_ghost"), 0.7 * np.clip(1.0 - np.abs(ghost + 0.8), 0.0, 1.0))
    debris = cover(nuclei_edge(rng, y, x, cell=9.0 * k, radius=(0.8 * k, 2.2 * k), aspect=(1.0, 2.0), keep=0.4))
    return mix(colour, style.colour("nec_debris"), debris)


def _background(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int, style: Style) -> np.ndarray:
    return np.broadcast_to(style.colour("back"), (y.size, 3))


_TEXTURES = (_tumour, _stroma, _lymphocytes, _necrosis, _background)  # by texture index
_REGION_COUNTS = (0.3, 0.3, 0.25, 0.15)  # chance of 1, 2, 3, 4 tissue regions


def _region_mask(rng: np.random.Generator, size: int, textures: Sequence[int] = range(GLASS)) -> np.ndarray:
    """Draw a size×size texture mask: 1–4 of ``textures`` (+ glass sometimes), large regions."""
    min_area = 0.04 * size * size  # smaller slivers are merged away: regions, not confetti
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    counts = _REGION_COUNTS[:len(textures)]
    while True:
        n_tissue = rng.choice(np.arange(1, len(counts) + 1), p=np.array(counts) / sum(counts))
        classes = list(rng.choice(np.asarray(textures), n_tissue, replace=False))
        if rng.random() < 0.45:
            classes.append(GLASS)
        seed_class = np.repeat(classes, rng.choice([1, 2], size=len(classes), p=[0.7, 0.3]))
        seeds = rng.uniform(-0.1 * size, 1.1 * size, (len(seed_class), 2)).astype(np.float32)
        # Warped coordinates turn straight Voronoi edges into smooth wavy borders.
        wy = yy + 0.12 * size * smooth_noise(rng, size, size / 6)
        wx = xx + 0.12 * size * smooth_noise(rng, size, size / 6)
        dist = (wy[None] - seeds[:, 0, None, None]) ** 2 + (wx[None] - seeds[:, 1, None, None]) ** 2
        while True:
            mask = seed_class[dist.argmin(0)]
            area = np.bincount(mask.ravel(), minlength=GLASS + 1)
            tiny = [c for c in classes if 0 < area[c] < min_area]
            if not tiny:
                break
            dist[np.isin(seed_class, tiny)] = np.inf
        if area[:GLASS].sum() >= 0.25 * size * size:  # at least a quarter tissue
            return mask.astype(np.uint8)


PAINTERS: dict[str, Painter] = {
    "classic": Painter(_region_mask, _TEXTURES, STYLES["default"], stain_sd=0.025),
    **EXTRA_PAINTERS,
}
"""Every way of drawing tissue, by name: ``classic`` (described above) and those of construct_lab.synthetic.painters."""


def get_painter(name: str) -> Painter:
    if name not in PAINTERS:
        raise DataError(f"unknown synthetic painter {name!r}; choose one of {', '.join(PAINTERS)}")
    return PAINTERS[name]


def paint(rng: np.random.Generator, mask: np.ndarray, style: Style | None = None, painter: str = "classic") -> np.ndarray:
    """Fill a square texture mask (0-3 tissue textures, 4 glass) with its textures: an H×W×3 uint8 RGB image.

    ``style`` gives the colours and structure size (None: the painter's own palette)."""
    drawer = get_painter(painter)
    style = drawer.palette if style is None else style
    size = mask.shape[0]
    stain = 1.0 + rng.normal(0.0, drawer.stain_sd, 3).astype(np.float32)  # per-tile staining variation
    image = np.empty((size * size, 3), np.float32)
    for c in np.unique(mask):
        flat = np.flatnonzero(mask == c)
        y, x = np.divmod(flat, size)
        colour = drawer.textures[c](rng, y, x, size, style)
        image[flat] = colour if c == GLASS else colour * stain  # glass takes no stain
    image = image.reshape(size, size, 3) + 3.0 * rng.standard_normal((size, size, 3), dtype=np.float32)
    return np.clip(np.rint(image, out=image), 0, 255).astype(np.uint8)


def make_tile(rng: np.random.Generator, size: int = 224, style: Style | None = None,
              textures: Sequence[int] = range(GLASS), alveoli: bool = False,
              painter: str = "classic") -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic tile: (H×W×3 uint8 RGB image, H×W uint8 texture mask, 4 = glass).

    ``textures`` limits the tissue textures drawn; ``alveoli`` punches white air spaces into the
    tissue (glass in the mask); ``painter`` names an entry of :data:`PAINTERS`.
    """
    mask = get_painter(painter).layout(rng, size, textures)
    if alveoli:
        mask = _punch_alveoli(rng, mask)
    return paint(rng, mask, style, painter), mask


def _punch_alveoli(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """White, round-ish air spaces (2-7 of them, 5-14 % of the side across) where there is tissue."""
    size = mask.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    holes = np.zeros(mask.shape, bool)
    for _ in range(int(rng.integers(2, 8))):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(0.05, 0.14, 2) * size / 2
        holes |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    out = mask.copy()
    out[holes & (mask != GLASS)] = GLASS
    return out


@dataclass(frozen=True)
class Layout:
    """How a synthetic dataset looks on disk, beside its class set."""

    textures: tuple[int, ...] | None = None
    """Texture index (0-3, :data:`TEXTURE_NAMES`) of each class; None = 0, 1, 2, ... in class order."""
    label_format: str = "bits"
    """Train labels in the names as ``[1101]`` ('bits') or ``[1 1 0 1]`` ('spaced'), or 'csv'."""
    label_csv: str = "labels.csv"
    """With label_format 'csv': the CSV's path under the dataset root (filename + one 0/1 column per class)."""
    val_folder: str = "val"
    """Name of the validation folder (LUAD-HistoSeg: 'valid')."""
    alveoli: bool = False
    """White air spaces inside tissue, labelled background (lung)."""

    def textures_for(self, classes: ClassSet) -> tuple[int, ...]:
        textures = self.textures if self.textures is not None else tuple(range(classes.num_classes))
        if len(textures) != classes.num_classes:
            raise DataError(f"the synthetic layout gives {len(textures)} textures for {classes.num_classes} classes "
                            f"({classes.describe()}); give one texture index per class")
        if len(set(textures)) != len(textures) or not all(0 <= t < GLASS for t in textures):
            raise DataError(f"synthetic textures must be distinct indices 0-{GLASS - 1} "
                            f"({', '.join(TEXTURE_NAMES)}), one per class; got {list(textures)}")
        return textures

    def record(self) -> dict:
        """The layout for the manifest (empty for the default BCSS-like layout, so old manifests stay valid)."""
        values, defaults = asdict(self), asdict(Layout())
        changed = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items() if v != defaults[k]}
        if self.label_format != "csv":
            changed.pop("label_csv", None)
        return changed


def _tile_name(slide_offset: int, index: int, size: int, label: np.ndarray | None, label_format: str = "bits") -> str:
    """BCSS-style tile name; train names end with the label, e.g. ``...+0[1101].png`` or ``...+0[1 1 0 1].png``."""
    slide, pos = divmod(index, _TILES_PER_SLIDE)
    row, col = divmod(pos, _SLIDE_GRID)
    bits = ""
    if label is not None and label_format != "csv":
        bits = "[" + (" " if label_format == "spaced" else "").join(str(int(b)) for b in label) + "]"
    return f"SYN-{slide_offset + slide + 1:04d}_xmin{col * size}_ymin{row * size}_MPP-0.2500+0{bits}.png"


def tile_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The Generator that draws tile ``index`` of ``split``: independent of the other tiles."""
    return np.random.default_rng([seed, _SPLITS.index(split), index])


def _write_split(out: Path, split: str, count: int, slide_offset: int, seed: int, size: int, style: Style | None,
                 classes: ClassSet, layout: Layout, painter: str = "classic") -> list[tuple[str, np.ndarray]]:
    """Write one split; returns the (file name, label) of each train tile."""
    textures = layout.textures_for(classes)
    to_class = np.full(GLASS + 1, classes.background, np.uint8)
    to_class[list(textures)] = np.arange(classes.num_classes)
    folder = out / (layout.val_folder if split == "val" else split)
    labels = []
    for i in range(count):
        image, texture_mask = make_tile(tile_rng(seed, split, i), size, style, textures, layout.alveoli, painter)
        mask = to_class[texture_mask]
        if split == "train":
            present = np.bincount(mask.ravel(), minlength=classes.num_classes + 1)[:classes.num_classes] > 0
            name = _tile_name(slide_offset, i, size, present, layout.label_format)
            write_image(folder / name, image, compress_level=1)
            labels.append((name, present))
        else:
            name = _tile_name(slide_offset, i, size, None)
            write_image(folder / "img" / name, image, compress_level=1)
            write_mask(folder / "mask" / name, mask, classes)
    return labels


def _write_label_csv(path: Path, labels: list[tuple[str, np.ndarray]], classes: ClassSet) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(("filename", *classes.names))]
    lines += [",".join((name, *(str(int(b)) for b in label))) for name, label in labels]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _is_complete(out: Path, manifest: dict, layout: Layout) -> bool:
    """True when ``out`` holds every file the manifest promises (nothing deleted since)."""
    counts = {
        "train": len(list((out / "train").glob("*.png"))),
        "val": min(len(list((out / layout.val_folder / sub).glob("*.png"))) for sub in ("img", "mask")),
        "test": min(len(list((out / "test" / sub).glob("*.png"))) for sub in ("img", "mask")),
    }
    if layout.label_format == "csv" and not (out / layout.label_csv).is_file():
        return False
    return all(counts[s] == manifest[s] for s in _SPLITS)


def generate_dataset(out: str | Path, n_train: int, n_val: int, n_test: int, seed: int, classes: ClassSet,
                     size: int = 224, style: str = "default", layout: Layout = Layout(), painter: str = "classic") -> None:
    """Write a synthetic dataset of ``classes`` in the ``layout`` to ``out``, with a ``synthetic.json``.

    ``painter`` names an entry of :data:`PAINTERS` (how regions and textures are drawn);
    ``style`` names an entry of :data:`STYLES` (colours and structure sizes), where ``default``
    means the painter's own palette.

    If ``out`` already holds a complete dataset made with the same arguments, nothing is done
    (so callers can "generate if missing"). Any other non-empty ``out`` raises DataError
    rather than being overwritten.
    """
    out = Path(out)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if any(n < 1 for n in counts.values()) or size < 32 or seed < 0:
        raise DataError(
            f"need at least 1 tile per split, size >= 32 and seed >= 0; got {counts}, size {size}, seed {seed}"
        )
    if style not in STYLES:
        raise DataError(f"unknown synthetic style {style!r}; choose one of {', '.join(STYLES)}")
    get_painter(painter)
    if layout.label_format not in ("bits", "spaced", "csv"):
        raise DataError(f"unknown label format {layout.label_format!r}; expected bits, spaced or csv")
    textures = layout.textures_for(classes)
    manifest = {"generator": "construct_lab.synthetic.tiles", "version": _VERSION, "seed": seed, "size": size, **counts}
    if style != "default":  # default manifests predate styles and stay valid
        manifest["style"] = style
    if painter != "classic":
        manifest["painter"] = painter
    manifest["classes"] = {name: TEXTURE_NAMES[t] for name, t in zip(classes.names, textures)}
    if layout.record():
        manifest["layout"] = layout.record()

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        manifest_path = out / MANIFEST
        if not manifest_path.is_file():
            raise DataError(
                f"{out} exists and is not a synthetic dataset ({MANIFEST} missing); refusing to overwrite it"
            )
        try:
            found = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{manifest_path}: unreadable manifest ({exc}); delete {out} to regenerate") from exc
        if found != manifest:
            raise DataError(
                f"{out} holds a synthetic dataset made with other arguments ({found}); "
                f"refusing to overwrite it with {manifest}; delete it or choose another --out"
            )
        if not _is_complete(out, manifest, layout):
            raise DataError(f"{out} is missing files listed in {manifest_path}; delete it to regenerate")
        print(f"{out} already holds this synthetic dataset ({MANIFEST} matches); skipping")
        return

    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the dataset should not be
        slide_offset = 0
        for split in _SPLITS:
            labels = _write_split(staging, split, counts[split], slide_offset, seed, size,
                                  None if style == "default" else STYLES[style], classes, layout, painter)
            if split == "train" and layout.label_format == "csv":
                _write_label_csv(staging / layout.label_csv, labels, classes)
            slide_offset += -(-counts[split] // _TILES_PER_SLIDE)  # splits never share a slide
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(staging, out)  # an empty existing ``out`` is replaced too
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    total = sum(counts.values())
    print(f"wrote {total} synthetic tiles to {out} in {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m construct_lab.synthetic.tiles",
        description=(
            "Generate a synthetic H&E-like dataset with the classes of a dataset preset (default BCSS-WSSS): "
            "OUT/train/*.png with labels in the names (e.g. ...+0[1101].png) or in a CSV, OUT/val/{img,mask}/*.png "
            "and OUT/test/{img,mask}/*.png with palette masks in the preset's values and colours "
            "(BCSS-WSSS: 0=TUM 1=STR 2=LYM 3=NEC 4=BACK). Deterministic per --seed. Re-running with the same arguments on a complete "
            "dataset does nothing; any other non-empty OUT is refused."
        ),
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; must be empty or absent)")
    parser.add_argument("--train", required=True, type=int, metavar="N", help="number of train tiles")
    parser.add_argument("--val", required=True, type=int, metavar="N", help="number of validation tiles")
    parser.add_argument("--test", required=True, type=int, metavar="N", help="number of test tiles")
    parser.add_argument("--seed", required=True, type=int, metavar="S", help="random seed")
    parser.add_argument("--size", type=int, default=224, help="tile side in pixels (default: 224)")
    parser.add_argument("--style", choices=sorted(STYLES), default="default",
                        help="colours and structure sizes: 'default', or 'variant' (another stain, 1.3x larger "
                             "structures) to check that a recipe is not tuned to one look")
    parser.add_argument("--painter", choices=sorted(PAINTERS), default="classic",
                        help="how regions and textures are drawn: 'classic' (default), or another painter "
                             "(construct_lab/synthetic/painters.py) to test transfer to tissue drawn another way")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, metavar="YAML",
                        help="config or dataset preset whose data.classes and data.background the tiles get "
                        f"(default: {DEFAULT_DATASET.relative_to(REPO)})")
    parser.add_argument("--textures", type=lambda t: tuple(int(v) for v in t.split(",")), default=None, metavar="I,J,..",
                        help="texture of each class, in class order: 0 tumour, 1 stroma, 2 lymphocytes, 3 necrosis "
                        "(default 0,1,2,...)")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--spaced-labels", action="store_true", help="train labels as [1 0 0 1] (LUAD-HistoSeg) instead of [1001]")
    labels.add_argument("--label-csv", metavar="NAME", help="train labels in OUT/NAME (filename + one 0/1 column per class)")
    parser.add_argument("--val-folder", default="val", help="name of the validation folder (default: val; LUAD-HistoSeg: valid)")
    parser.add_argument("--alveoli", action="store_true", help="white air spaces inside tissue, labelled background (lung)")
    args = parser.parse_args(argv)
    fmt = "csv" if args.label_csv else "spaced" if args.spaced_labels else "bits"
    layout = Layout(textures=args.textures, label_format=fmt, label_csv=args.label_csv or "labels.csv",
                    val_folder=args.val_folder, alveoli=args.alveoli)
    try:
        from construct.config import load_config  # deferred: the generator itself needs no config

        classes = ClassSet.from_config(load_config(args.dataset))
        generate_dataset(args.out, args.train, args.val, args.test, args.seed, classes, args.size, args.style, layout,
                         args.painter)
    except ConStructError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
