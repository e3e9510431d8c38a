"""Texture families in random colours: the teacher's pretraining task, which knows nothing of tissue.

The real teacher (MiT-B1) learned on ImageNet to tell objects and textures apart, which is why
its token affinities follow region boundaries. The tiny teacher learns the same skill on a task
that shares no class or structure with the tissue generator: label every pixel of an image made
of Voronoi regions with the texture family that fills it (stripes, dots, checks, rings, blobs,
hatching, flat) and with the hue band of its colours (six bands around the colour wheel), as
ImageNet features encode both texture and colour.
"""

from __future__ import annotations

import colorsys

import numpy as np

FAMILIES = ("stripes", "dots", "checks", "rings", "blobs", "hatching", "flat")
HUE_BANDS = 6


def _family(rng: np.random.Generator, family: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Pattern intensity in [0, 1] of one family over the whole grid."""
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = yy * np.cos(angle) - xx * np.sin(angle)
    period = rng.uniform(5.0, 14.0)
    if family == 0:
        return (np.sin(2 * np.pi * u / period) > 0).astype(np.float32)
    if family == 1:
        radius = rng.uniform(0.2, 0.35) * period
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        return (du * du + dv * dv < radius * radius).astype(np.float32)
    if family == 2:
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if family == 3:
        cy, cx = rng.uniform(0, yy.shape[0], 2)
        return (np.sin(2 * np.pi * np.hypot(yy - cy, xx - cx) / period) > 0).astype(np.float32)
    if family == 4:
        field = sum(np.sin(2 * np.pi * (yy * a + xx * b) / (3 * period) + p)
                    for a, b, p in rng.uniform(-1, 1, (6, 3)) * [1, 1, np.pi])
        return (field > 0).astype(np.float32)
    if family == 5:
        lines = (np.abs(np.sin(np.pi * u / period)) < 0.25) | (np.abs(np.sin(np.pi * v / period)) < 0.25)
        return lines.astype(np.float32)
    return np.zeros_like(yy)


def make_texture_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(size×size×3 uint8 image, texture-family labels, hue-band labels) of 2–5 textured regions."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    n = int(rng.integers(2, 6))
    seeds = rng.uniform(0, size, (n, 2))
    wobble = rng.uniform(4, 12) * np.sin(2 * np.pi * (yy + xx * rng.uniform(-1, 1)) / rng.uniform(40, 90))
    dist = (yy[None] + wobble[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
    region = dist.argmin(0)
    image = np.zeros((size, size, 3), np.float32)
    families = np.zeros((size, size), np.int64)
    hues = np.zeros((size, size), np.int64)
    for r in range(n):
        inside = region == r
        family, band = int(rng.integers(len(FAMILIES))), int(rng.integers(HUE_BANDS))
        hue = (band + rng.uniform(0.15, 0.85)) / HUE_BANDS
        saturation, value = rng.uniform(0.35, 0.9), rng.uniform(0.6, 1.0)
        low = np.array(colorsys.hsv_to_rgb(hue, saturation, value * 0.45), np.float32) * 255
        high = np.array(colorsys.hsv_to_rgb(hue, saturation * 0.5, value), np.float32) * 255
        pattern = _family(rng, family, yy, xx)[inside][:, None]
        image[inside] = low + pattern * (high - low)
        families[inside], hues[inside] = family, band
    image += rng.normal(0, 4, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), families, hues
