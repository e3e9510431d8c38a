"""Files written whole or not at all: a reader, a crash or a failing writer never leaves half a file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield ``<path>.tmp`` for the block to write; renamed onto ``path`` only when the block succeeds.

    The rename is atomic on one file system, so ``path`` always holds either the previous file or
    the new one. A block that raises leaves no temporary file; a killed process may leave one, which
    the next write replaces.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
