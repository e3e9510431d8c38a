"""ConStruct: structural distillation of foundation models for prototype-based weakly supervised
segmentation of histopathology.

The public API is :func:`load_segmenter` (construct/api.py); the user commands are in
construct/commands. Importing the package itself stays light: the API loads on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Segmenter", "TileResult", "load_segmenter"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from construct import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
