"""Two more painters of synthetic tissue, each drawn another way than the classic one
(construct_lab.synthetic.tiles), so that transfer to tissue a model never saw can be measured.

The classes keep what a pathologist would name them by (TUM: large purple nuclei; STR: pink
fibres with spindle nuclei; LYM: small dark round nuclei packed densely; NEC: pale tissue with
nuclear debris; BACK: glass), but shapes, layout and colours are made differently:

- ``noise``: regions are where one class's smooth noise field is highest (irregular blobs, some
  in pieces); nuclei are Gaussian bumps at Poisson-random places (no grid), roughened by noise and
  gathered in nests; collagen is white noise smeared along a wandering direction (streaks, no
  sine waves); necrosis is granular with specks of debris. A magenta eosin and slate nuclei.
- ``glands``: regions are straight-edged Voronoi cells with elliptical nests on top; tumour is a
  mosaic of polygonal cells with membranes, one large nucleus each, and gland lumens; collagen
  is thin sharp dashed lines in two crossing bundles; lymphocytes are small nuclei with a clear
  halo; necrosis is a mosaic of ghost cells with scattered dust. A brownish eosin and blue-black
  nuclei.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from construct_lab.synthetic.fields import GLASS, Painter, Style, blob_field, cells, gaussian_filter, mix, smooth_noise

MIN_REGION = 0.04
"""Regions smaller than this share of the tile are merged away: regions, not confetti."""
MIN_TISSUE = 0.25
"""At least this share of a tile is tissue."""


_REGION_COUNTS = (0.3, 0.3, 0.25, 0.15)  # chance of 1, 2, 3, 4 tissue regions, as the classic painter draws them


def _draw_classes(rng: np.random.Generator, textures: Sequence[int]) -> list[int]:
    """1–4 of ``textures``, and glass sometimes."""
    counts = np.asarray(_REGION_COUNTS[:len(textures)])
    n_tissue = rng.choice(np.arange(1, len(counts) + 1), p=counts / counts.sum())
    classes = [int(c) for c in rng.choice(np.asarray(textures), n_tissue, replace=False)]
    if rng.random() < 0.45:
        classes.append(GLASS)
    return classes


def _merge_small(score: np.ndarray, owner: np.ndarray, size: int) -> np.ndarray | None:
    """Texture mask of the highest-scoring candidate per pixel (score: K×H×W, owner: K texture
    indices), dropping textures that cover less than MIN_REGION; None when too little tissue."""
    score = score.copy()
    while True:
        mask = owner[score.argmax(0)]
        area = np.bincount(mask.ravel(), minlength=GLASS + 1)
        tiny = [c for c in np.unique(owner) if 0 < area[c] < MIN_REGION * size * size]
        if not tiny:
            break
        score[np.isin(owner, tiny)] = -np.inf
    if area[:GLASS].sum() < MIN_TISSUE * size * size:
        return None
    return mask.astype(np.uint8)


def _noise_layout(rng: np.random.Generator, size: int, textures: Sequence[int] = range(GLASS)) -> np.ndarray:
    while True:
        classes = np.asarray(_draw_classes(rng, textures))
        sigma = size / rng.uniform(4.0, 8.0)
        score = np.stack([smooth_noise(rng, size, sigma) + rng.normal(0.0, 0.3) for _ in classes])
        mask = _merge_small(score, classes, size)
        if mask is not None:
            return mask


def _glands_layout(rng: np.random.Generator, size: int, textures: Sequence[int] = range(GLASS)) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    while True:
        classes = _draw_classes(rng, textures)
        owner = np.repeat(classes, rng.integers(1, 4, len(classes)))
        seeds = rng.uniform(-0.1 * size, 1.1 * size, (len(owner), 2)).astype(np.float32)
        score = -((yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2)
        # Elliptical nests of one of the classes on top of the straight-edged cells.
        nests = int(rng.integers(0, 3)) if len(classes) > 1 else 0
        extra, extra_owner = [], []
        for _ in range(nests):
            cy, cx = rng.uniform(0.15, 0.85, 2) * size
            ry, rx = rng.uniform(0.12, 0.25, 2) * size
            theta = rng.uniform(0, np.pi)
            u = ((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / rx
            v = ((yy - cy) * np.cos(theta) - (xx - cx) * np.sin(theta)) / ry
            extra.append(np.where(u * u + v * v < 1.0, np.float32(1.0), -np.inf).astype(np.float32))
            extra_owner.append(classes[int(rng.integers(len(classes)))])
        if extra:
            score = np.concatenate([score, np.stack(extra)])
            owner = np.concatenate([owner, extra_owner])
        mask = _merge_small(score, np.asarray(owner), size)
        if mask is not None:
            return mask


def _dark(rng: np.random.Generator, colour: np.ndarray, n: int, spread: float) -> np.ndarray:
    """``n`` copies of a nuclear colour, each pixel darker or lighter by a random factor."""
    return colour * (1.0 + spread * rng.standard_normal(n, dtype=np.float32))[:, None]


def _soft(field: np.ndarray, threshold: float, width: float) -> np.ndarray:
    return np.clip((field - threshold) / width + 0.5, 0.0, 1.0)


# --- noise painter -------------------------------------------------------------------------------

def _noise_tumour(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int, style: Style) -> np.ndarray:
    k = style.scale
    nests = np.clip(0.6 + 0.6 * smooth_noise(rng, size, 18.0 * k), 0.15, 1.0)
    bumps = blob_field(rng, size, 12.5 * k, 3.5 * k, density=nests)
    rough = bumps + 0.12 * smooth_noise(rng, size, 1.5 * k)  # irregular nuclear contours
    nucleus = _soft(rough, 0.5, 0.25)[y, x]
    cyto = style.colour("tum_cyto") * (1.0 + 0.06 * smooth_noise(rng, size, 3.0 * k)[y, x])[:, None]
    return mix(cyto, _dark(rng, style.colour("tum_nuc"), y.size, 0.14), nucleus)


def _noise_stroma(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int, style: Style) -> np.ndarray:
    k = style.scale
    angle = rng.uniform(0, np.pi)
    streaks = gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), 10.0 * k, 1.1 * k, angle)
    streaks /= streaks.std() + 1e-6
    # The direction wanders: the streak field is read at smoothly displaced coordinates.
    dy = np.clip(y + 5.0 * k * smooth_noise(rng, size, 20.0 * k)[y, x], 0, size - 1).astype(np.intp)
    dx = np.clip(x + 5.0 * k * smooth_noise(rng, size, 20.0 * k)[y, x], 0, size - 1).astype(np.intp)
    fibre = _soft(streaks[dy, dx], 0.3, 1.2)
    colour = mix(np.broadcast_to(style.colour("str_base"), (y.size, 3)), style.colour("str_fibre"), fibre)
    spindle = _soft(blob_field(rng, size, 26.0 * k, 5.0 * k, 1.4 * k, angle), 0.5, 0.2)[y, x]
    return mix(colour, style.colour("nuc_spindle"), spindle)


def _noise_lymphocytes(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int, style: Style) -> np.ndarray:
    k = style.scale
    clusters = np.clip(0.85 + 0.3 * smooth_noise(rng, size, 10.0 * k), 0.4, 1.0)
    bumps = blob_field(rng, size, 5.0 * k, 1.7 * k, density=clusters)
    nucleus = _soft(bumps, 0.5, 0.2)[y, x]
    base = np.broadcast_to(style.colour("lym_base"), (y.size, 3))
    return mix(base, _dark(rng, style.colour("lym_nuc"), y.size, 0.1), nucleus)


def _noise_necrosis(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int, style: Style) -> np.ndarray:
    k = style.scale
    colour = style.colour("nec_base") * (1.0 + 0.06 * smooth_noise(rng, size, 12.0 * k)[y, x])[:, None]
    grain = smooth_noise(rng, size, 1.5 * k)[y, x]
    colour = mix(colour, style.colour("nec_ghost"), _soft(grain, 0.6, 0.8))
    specks = _soft(smooth_noise(rng, size, 0.9 * k), 1.9, 0.4)[y, x]
    return mix(colour, style.colour("nec_debris"), specks)


def _noise_background(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int, style: Style) -> np.ndarray:
    tint = 1.0 + 0.01 * smooth_noise(rng, size, 30.0)[y, x]
    return style.colour("back") * tint[:, None]


# --- glands painter ------------------------------------------------------------------------------

def _glands_tumour(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int, style: Style) -> np.ndarray:
    k = style.scale
    centre, border, shade = cells(rng, y, x, 12.0 * k)
    nucleus = np.clip((0.42 + 0.12 * shade) * 12.0 * k - centre + 0.5, 0.0, 1.0)
    membrane = np.clip(1.5 - border, 0.0, 1.0)
    colour = mix(np.broadcast_to(style.colour("tum_cyto"), (y.size, 3)), style.colour("str_fibre"), 0.35 * membrane)
    chromatin = style.colour("tum_nuc") * (0.85 + 0.3 * shade)[:, None]
    colour = mix(colour, chromatin, nucleus)
    if rng.random() < 0.6:  # glandular lumens: empty spaces among the cells
        lumen_d, _, lumen_keep = cells(rng, y, x, 48.0 * k)
        lumen = np.clip(9.0 * k - lumen_d + 0.5, 0.0, 1.0) * (lumen_keep < 0.5)
        colour = mix(colour, style.colour("back") * 0.97, lumen)
    return colour


def _glands_stroma(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int, style: Style) -> np.ndarray:
    k = style.scale
    colour = np.broadcast_to(style.colour("str_base"), (y.size, 3))
    angle = rng.uniform(0, np.pi)
    for bundle_angle in (angle, angle + rng.uniform(0.3, 0.8)):
        along = x * np.cos(bundle_angle) + y * np.sin(bundle_angle)
        across = y * np.cos(bundle_angle) - x * np.sin(bundle_angle)
        bend = 0.002 * rng.normal() * (along - size / 2) ** 2  # gently curved lines
        period = rng.uniform(4.0, 7.0) * k
        line = np.clip(1.0 - np.abs(((across + bend) / period) % 1.0 - 0.5) * period / 0.9, 0.0, 1.0)
        # Each line breaks into dashes, out of step with its neighbours.
        dashes = np.sin(2 * np.pi * along / (rng.uniform(25, 45) * k) + rng.uniform(0, 2 * np.pi)
                        + 2.4 * np.floor((across + bend) / period)) > -0.4
        colour = mix(colour, style.colour("str_fibre"), 0.85 * line * dashes)
    centre, _, keep = cells(rng, y, x, 20.0 * k, stretch=3.5, angle=angle)
    spindle = np.clip(2.0 * k - centre + 0.5, 0.0, 1.0) * (keep < 0.35)
    return mix(colour, style.colour("nuc_spindle"), spindle)


def _glands_lymphocytes(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int, style: Style) -> np.ndarray:
    k = style.scale
    centre, _, shade = cells(rng, y, x, 6.5 * k)
    radius = (2.0 + 0.4 * shade) * k
    nucleus = np.clip(radius - centre + 0.5, 0.0, 1.0)
    halo = np.clip(radius + 1.2 * k - centre + 0.5, 0.0, 1.0) - nucleus
    base = mix(np.broadcast_to(style.colour("lym_base"), (y.size, 3)), style.colour("back"), 0.5 * halo)
    return mix(base, _dark(rng, style.colour("lym_nuc"), y.size, 0.08), nucleus)


def _glands_necrosis(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int, style: Style) -> np.ndarray:
    k = style.scale
    _, border, shade = cells(rng, y, x, 15.0 * k)
    colour = style.colour("nec_base") * (0.97 + 0.06 * shade)[:, None]
    colour = mix(colour, style.colour("nec_ghost"), 0.8 * np.clip(2.0 - border, 0.0, 1.0))
    dust = rng.random(y.size, dtype=np.float32) < 0.025
    return mix(colour, style.colour("nec_debris"), 0.9 * dust)


def _glands_background(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int, style: Style) -> np.ndarray:
    slope = rng.normal(0.0, 0.02, 2)
    shade = 1.0 + slope[0] * (y / size - 0.5) + slope[1] * (x / size - 0.5)
    return style.colour("back") * shade[:, None].astype(np.float32)


_NOISE_PALETTE = Style(
    back=(246, 244, 247), tum_cyto=(196, 140, 200), tum_nuc=(72, 56, 132), str_base=(248, 178, 214),
    str_fibre=(226, 104, 170), lym_base=(190, 160, 206), lym_nuc=(44, 40, 96), nec_base=(240, 214, 232),
    nec_debris=(112, 74, 150), nec_ghost=(226, 190, 218), nuc_spindle=(96, 70, 146), scale=1.0,
)
_GLANDS_PALETTE = Style(
    back=(240, 238, 233), tum_cyto=(210, 160, 176), tum_nuc=(52, 44, 110), str_base=(238, 196, 186),
    str_fibre=(196, 104, 120), lym_base=(206, 176, 196), lym_nuc=(30, 30, 80), nec_base=(236, 210, 200),
    nec_debris=(70, 58, 120), nec_ghost=(214, 178, 176), nuc_spindle=(70, 60, 130), scale=1.1,
)

PAINTERS: dict[str, Painter] = {
    "noise": Painter(_noise_layout, (_noise_tumour, _noise_stroma, _noise_lymphocytes, _noise_necrosis,
                                     _noise_background), _NOISE_PALETTE, stain_sd=0.05),
    "glands": Painter(_glands_layout, (_glands_tumour, _glands_stroma, _glands_lymphocytes, _glands_necrosis,
                                       _glands_background), _GLANDS_PALETTE, stain_sd=0.05),
}
