"""Reading and writing tiles and masks, with errors that name the offending file.

Every read forces a full decode (``Image.load``) so a corrupt or truncated PNG fails here,
not halfway through training; PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False on
purpose. Writes go to a temporary file that is then renamed, so a crash never leaves a
half-written PNG behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from construct.atomic import atomic_path
from construct.classes import ClassSet
from construct.errors import DataError


def _open(path: Path) -> Image.Image:
    """Open and fully decode an image, turning any failure into a DataError."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with Image.open(path) as img:
            img.load()
        return img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # UnidentifiedImageError and "image file is truncated" are OSErrors; broken
        # chunks in some formats surface as SyntaxError or ValueError.
        raise DataError(f"{path}: not a readable image ({exc})") from exc


TILE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr")
"""PIL modes a tile may have: 8 bits per channel (grey, palette, RGB, with or without alpha)."""
MASK_MODES = ("P", "L")


def _mode_text(mode: str) -> str:
    """A PIL mode in words, naming its bit depth where it is not 8 bits per channel."""
    depth = {"I;16": "16-bit grey", "I;16B": "16-bit grey", "I;16L": "16-bit grey", "I": "32-bit integer",
             "F": "32-bit float", "RGB": "8-bit RGB", "RGBA": "8-bit RGBA"}
    return f"{mode!r} ({depth[mode]})" if mode in depth else repr(mode)


def image_header(path: str | Path) -> tuple[int, int, str]:
    """(width, height, PIL mode) read from the file's header only, without decoding the pixels.

    Raises DataError naming the file when it is missing, not an image, or a tile mode that is not
    8 bits per channel.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            width, height, mode = img.width, img.height, img.mode
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    if mode not in TILE_MODES:
        raise DataError(f"{path}: unsupported image mode {_mode_text(mode)}; expected 8-bit RGB, grey or palette")
    return width, height, mode


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as an H×W×3 uint8 RGB array.

    Grey and palette images are converted to RGB. Images with transparency (RGBA, LA, or a
    palette with a transparent entry) are alpha-composited onto white, the colour of empty
    slide background, rather than having their alpha dropped. Modes that are not 8 bits per
    channel (16-bit, float) raise DataError.
    """
    path = Path(path)
    img = _open(path)
    if img.mode not in TILE_MODES:
        raise DataError(f"{path}: unsupported image mode {_mode_text(img.mode)}; expected 8-bit RGB, grey or palette")
    if img.mode in ("LA", "PA", "RGBA") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return np.rint(rgb).astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def read_mask(path: str | Path, classes: ClassSet) -> np.ndarray:
    """Read a class mask (palette 'P' or 8-bit grey 'L' PNG or TIFF) as an H×W uint8 array of internal indices.

    The file holds the dataset's mask values 0..C (C = number of classes; background at
    ``data.background.index``); they are mapped to classes 0..C-1 and background C. A value above
    C raises DataError naming the file.
    """
    path = Path(path)
    img = _open(path)
    top = classes.num_classes
    if img.mode not in MASK_MODES:
        raise DataError(
            f"{path}: mask has mode {_mode_text(img.mode)}; expected an 8-bit palette ('P') or grey ('L') PNG "
            f"holding class values 0-{top}"
        )
    mask = np.asarray(img, dtype=np.uint8).copy()
    bad = np.unique(mask[mask > top])
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        raise DataError(f"{path}: mask holds invalid class values {shown}; expected 0-{top} "
                        f"({', '.join(classes.names)} and {classes.background_name})")
    return classes.to_internal(mask)


def _save_atomic(img: Image.Image, path: Path, **params: object) -> None:
    """Save ``img`` as PNG via a temporary file in the same folder, then rename it."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        img.save(handle, format="PNG", **params)


def write_image(path: str | Path, image: np.ndarray, compress_level: int = 6) -> None:
    """Write an H×W×3 uint8 RGB array as a PNG (atomically)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 uint8 array, got {image.dtype} {image.shape}")
    _save_atomic(Image.fromarray(image), Path(path), compress_level=compress_level)


def write_mask(path: str | Path, mask: np.ndarray, classes: ClassSet) -> None:
    """Write an H×W mask of internal indices (0..C) as a palette PNG in the dataset's values and colours."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"expected an H×W integer mask, got {mask.dtype} {mask.shape}")
    top = classes.num_classes
    if mask.size and (mask.min() < 0 or mask.max() > top):
        raise ValueError(f"mask values must be 0-{top}, got {mask.min()}..{mask.max()}")
    img = Image.fromarray(classes.to_dataset(mask.astype(np.uint8)))
    palette = [0] * (3 * (top + 1))
    for internal, value in enumerate(classes.mask_values):
        palette[3 * value: 3 * value + 3] = classes.palette[internal]
    img.putpalette(palette)  # turns the 'L' image into a 'P' image
    _save_atomic(img, Path(path))
