"""Building blocks of the synthetic tissue painters: palettes and random fields.

:class:`Style` is one "lab" (stain colours and a size factor); the fields are smooth Gaussian
noise, cellular noise (nuclei at jittered grid points) and colour blending, shared by every
painter (construct_lab.synthetic.tiles, construct_lab.synthetic.painters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Style:
    """Colours (RGB, 0-255) of every class's ground and nuclei/fibres, and a size factor for its
    nuclei, cells and fibres: one "lab" of the generator. ``variant`` is a second lab with another
    stain and magnification, used to check that a recipe is not tuned to the default look."""

    back: tuple[float, float, float] = (243, 241, 245)
    tum_cyto: tuple[float, float, float] = (216, 158, 212)
    tum_nuc: tuple[float, float, float] = (98, 52, 150)
    str_base: tuple[float, float, float] = (242, 190, 212)
    str_fibre: tuple[float, float, float] = (214, 92, 152)
    lym_base: tuple[float, float, float] = (200, 158, 208)
    lym_nuc: tuple[float, float, float] = (50, 30, 108)
    nec_base: tuple[float, float, float] = (234, 204, 224)
    nec_debris: tuple[float, float, float] = (130, 64, 148)
    nec_ghost: tuple[float, float, float] = (214, 172, 202)
    nuc_spindle: tuple[float, float, float] = (110, 60, 150)
    scale: float = 1.0

    def colour(self, name: str) -> np.ndarray:
        return np.asarray(getattr(self, name), np.float32)


STYLES: dict[str, Style] = {
    "default": Style(),
    # A browner eosin, a bluer haematoxylin and 1.3x larger structures (a higher magnification).
    "variant": Style(
        back=(236, 238, 232), tum_cyto=(222, 176, 170), tum_nuc=(60, 60, 128), str_base=(240, 206, 190),
        str_fibre=(204, 112, 110), lym_base=(214, 184, 190), lym_nuc=(36, 40, 96), nec_base=(238, 220, 206),
        nec_debris=(92, 80, 140), nec_ghost=(222, 194, 186), nuc_spindle=(80, 72, 140), scale=1.3,
    ),
}


@lru_cache(maxsize=16)
def gaussian_transfer(size: int, sigma: float) -> np.ndarray:
    """rfft2 transfer function of a Gaussian blur (std ``sigma`` px) that keeps white noise at
    unit variance and removes its mean."""
    fy = np.fft.fftfreq(size)[:, None]
    full = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fy**2 + np.fft.fftfreq(size)[None, :] ** 2))
    full[0, 0] = 0.0
    half = full[:, : size // 2 + 1] / np.sqrt(np.mean(full**2))
    return half.astype(np.float32)


def smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """A size×size zero-mean Gaussian random field of unit variance, correlation length ~sigma."""
    # A field this smooth has no detail below ~sigma, so it is drawn on a grid up to 16× coarser
    # (keeping >= 2 coarse pixels per sigma) and upsampled: the same look at a fraction of the cost.
    factor = 1
    while factor < 16 and factor * 2 <= sigma / 2:
        factor *= 2
    m = -(-size // factor)
    white = rng.standard_normal((m, m), dtype=np.float32)
    field = np.fft.irfft2(np.fft.rfft2(white) * gaussian_transfer(m, sigma / factor), s=(m, m))
    if factor > 1:
        field = np.asarray(Image.fromarray(field).resize((m * factor, m * factor), Image.Resampling.BICUBIC))
    return field[:size, :size]


def nuclei_edge(
    rng: np.random.Generator,
    y: np.ndarray,
    x: np.ndarray,
    cell: float,
    radius: tuple[float, float],
    aspect: tuple[float, float] = (1.0, 1.0),
    keep: float = 1.0,
    angle: float | None = None,
) -> np.ndarray:
    """Signed distance (< 0 inside, in nucleus-scaled px) from pixels (y, x) to nuclei.

    Nuclei are ellipses at jittered grid points, one per ``cell``×``cell`` cell, kept with
    probability ``keep``, so they pack densely without piling up (cellular noise). ``angle``
    fixes the long axis (spindle nuclei along fibres); otherwise it is random per nucleus.
    Only values below ~0.5 (on or near a nucleus) are exact: each pixel checks just the 2×2
    cells nearest to it, which is enough because centres keep a margin from their cell's
    border that stops any nucleus reaching past the middle of the next cell.
    """
    reach = aspect[1] * (radius[1] + 0.5)
    margin = max(0.0, reach - cell / 2)
    if margin >= cell / 2:
        raise ValueError(f"nuclei of reach {reach:.1f} px do not fit cells of {cell} px")
    y, x = y.astype(np.float32), x.astype(np.float32)
    n = int((max(y.max(), x.max()) + 1) // cell) + 3
    grid = np.arange(n, dtype=np.float32) - 1.0  # cell index i covers [(i-1)·cell, i·cell)
    cy = grid[:, None] * cell + rng.uniform(margin, cell - margin, (n, n))
    cx = grid[None, :] * cell + rng.uniform(margin, cell - margin, (n, n))
    rad = rng.uniform(*radius, (n, n))
    rad[rng.random((n, n)) >= keep] = -1e6  # a dropped nucleus is never the nearest
    asp = rng.uniform(*aspect, (n, n))
    theta = rng.uniform(0, np.pi, (n, n)) if angle is None else angle + rng.normal(0, 0.15, (n, n))
    cos, sin = np.cos(theta), np.sin(theta)
    # One row per parameter, so each neighbour costs a single gather. The ellipse is the unit
    # circle scaled by ``asp`` along the long axis: u = along / asp, v = across * asp.
    table = np.stack([cy, cx, cos / asp, sin / asp, cos * asp, sin * asp, rad]).astype(np.float32)
    table = table.reshape(7, n * n)
    # Half-cell indices give both the pixel's cell (h // 2) and which side of it the pixel is
    # on (h % 2), hence the neighbour row / column to check.
    hy, hx = (y * (2.0 / cell)).astype(np.intp), (x * (2.0 / cell)).astype(np.intp)
    own = ((hy >> 1) + 1) * n + (hx >> 1) + 1
    ny, nx = ((hy & 1) * 2 - 1) * n, (hx & 1) * 2 - 1
    best = np.full(y.shape, np.inf, np.float32)
    for cells in (own, own + ny, own + nx, own + ny + nx):
        p_cy, p_cx, c1, s1, c2, s2, p_rad = np.take(table, cells, axis=1)
        oy, ox = y - p_cy, x - p_cx
        u, v = ox * c1 + oy * s1, oy * c2 - ox * s2
        np.minimum(best, np.sqrt(u * u + v * v) - p_rad, out=best)
    return best


def cover(edge: np.ndarray) -> np.ndarray:
    """Nucleus coverage in [0, 1] from a signed edge distance, anti-aliased over one pixel."""
    return np.clip(0.5 - edge, 0.0, 1.0)


def mix(base: np.ndarray, top: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend per-pixel colours: (N,3) or (3,) ``base`` towards ``top`` by (N,) ``alpha``."""
    return base + alpha[:, None] * (top - base)


GLASS = 4
"""Texture index of glass (background) in the generator's texture masks; 0-3 are tissue textures."""

Texture = Callable[[np.random.Generator, np.ndarray, np.ndarray, int, Style], np.ndarray]
"""Colours (N×3 float RGB) of the pixels (y, x) of one class region of a size×size tile."""


@dataclass(frozen=True)
class Painter:
    """One way of drawing tissue: how a tile is cut into class regions and how each class is filled.

    Painters differ in structure (region shapes, how nuclei, cells and fibres are drawn), not only in
    colour, so that a model pretrained on some painters can be tested on tissue drawn by another.
    """

    layout: Callable[[np.random.Generator, int, Sequence[int]], np.ndarray]
    """Draws a size×size uint8 texture mask from the given tissue textures (and GLASS for glass)."""
    textures: tuple[Texture, ...]
    """One texture function per texture index, glass last."""
    palette: Style
    """Colours and size factor used when the caller names no style."""
    stain_sd: float
    """Standard deviation of the per-tile, per-channel stain factor on tissue."""


def gaussian_filter(field: np.ndarray, sigma_along: float, sigma_across: float, angle: float = 0.0) -> np.ndarray:
    """A square field blurred by an oriented Gaussian (std ``sigma_along`` along ``angle``,
    ``sigma_across`` across it), periodic boundaries, through the FFT."""
    size = field.shape[0]
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
    along = fx * np.cos(angle) + fy * np.sin(angle)
    across = fy * np.cos(angle) - fx * np.sin(angle)
    transfer = np.exp(-2.0 * np.pi**2 * ((sigma_along * along) ** 2 + (sigma_across * across) ** 2))
    return np.fft.irfft2(np.fft.rfft2(field) * transfer, s=field.shape).astype(np.float32)


def blob_field(rng: np.random.Generator, size: int, spacing: float, sigma_along: float, sigma_across: float | None = None,
               angle: float = 0.0, density: np.ndarray | None = None) -> np.ndarray:
    """Gaussian bumps of peak ~1 at Poisson-random centres (mean ``spacing`` px apart, thinned by
    ``density`` in [0, 1] where given), overlapping ones summed: nuclei without a grid."""
    impulses = (rng.random((size, size), dtype=np.float32) < 1.0 / spacing**2).astype(np.float32)
    if density is not None:
        impulses *= rng.random((size, size), dtype=np.float32) < density
    sigma_across = sigma_along if sigma_across is None else sigma_across
    return gaussian_filter(impulses, sigma_along, sigma_across, angle) * np.float32(2.0 * np.pi * sigma_along * sigma_across)


def cells(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, cell: float, stretch: float = 1.0,
          angle: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Worley (cellular) noise at pixels (y, x): distance to the nearest jittered grid point, the
    gap to the second nearest (small on cell borders) and a per-cell random number in [0, 1).
    ``stretch`` > 1 shortens distances along ``angle``, elongating cells (and their nuclei) along it."""
    y, x = y.astype(np.float32), x.astype(np.float32)
    if stretch != 1.0:
        cos, sin = np.cos(angle), np.sin(angle)
        y, x = (y * cos - x * sin), (x * cos + y * sin) / stretch
        y, x = y - y.min(), x - x.min()
    n = int((max(y.max(), x.max()) + 1) // cell) + 3
    centre_y = (np.arange(n, dtype=np.float32)[:, None] - 1 + rng.random((n, n), dtype=np.float32)) * cell
    centre_x = (np.arange(n, dtype=np.float32)[None, :] - 1 + rng.random((n, n), dtype=np.float32)) * cell
    value = rng.random((n, n), dtype=np.float32)
    gy, gx = (y // cell).astype(np.intp) + 1, (x // cell).astype(np.intp) + 1
    first = np.full(y.shape, np.inf, np.float32)
    second = np.full(y.shape, np.inf, np.float32)
    owner = np.zeros(y.shape, np.float32)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            iy, ix = np.clip(gy + dy, 0, n - 1), np.clip(gx + dx, 0, n - 1)
            dist = np.hypot(y - centre_y[iy, ix], x - centre_x[iy, ix])
            closer = dist < first
            second = np.where(closer, first, np.minimum(second, dist))
            owner = np.where(closer, value[iy, ix], owner)
            first = np.minimum(first, dist)
    return first, second - first, owner
