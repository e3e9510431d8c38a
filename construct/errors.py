"""Error types users see as one clear line (the CLIs print them without a traceback)."""

from __future__ import annotations

import re
from pathlib import Path

# torch.utils.data re-raises a worker's exception as ``type(exc)(wrapped)`` where ``wrapped`` is
# "Caught X in DataLoader worker process N.\nOriginal Traceback (most recent call last): ...".
_WORKER_WRAPPED = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.ASCII)


class ConStructError(Exception):
    """Base class: a problem with the user's input, files or setup, not a bug.

    When a DataLoader worker raised it, the main process gets a copy whose message is the
    worker's whole traceback; the copy keeps only the original one-line message (the worker
    traceback is attached as a note, so ``--debug`` still shows it).
    """

    def __init__(self, *args: object) -> None:
        note = None
        if len(args) == 1 and isinstance(args[0], str) and _WORKER_WRAPPED.match(args[0]):
            note, args = args[0], (_original_message(args[0], type(self)),)
        super().__init__(*args)
        if note is not None and hasattr(self, "add_note"):  # Python >= 3.11
            self.add_note(note.rstrip())


def _original_message(wrapped: str, cls: type) -> str:
    """The message of the worker's exception: what follows its ``module.Class: `` line prefix."""
    for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        start = wrapped.rfind("\n" + prefix)
        if start >= 0:
            return wrapped[start + 1 + len(prefix):].strip()
    return wrapped.strip().splitlines()[-1]


class ConfigError(ConStructError):
    """A configuration file or override is invalid."""


class DataError(ConStructError):
    """A dataset file or folder is missing or invalid."""


class CheckpointError(ConStructError):
    """A checkpoint or weight file is missing, untrusted or does not fit the model."""


def os_error_reason(exc: OSError, path: str | Path | None = None) -> str:
    """Why a file-system call on ``path`` (default: the error's file name) failed, in a few words.

    "Not a directory" / "File exists" from mkdir become "<the part of the path> is a file, not a folder".
    """
    target = path if path is not None else exc.filename
    if isinstance(exc, (NotADirectoryError, FileExistsError)) and isinstance(target, (str, Path)):
        target = Path(target)
        existing = next((p for p in (target, *target.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            return f"{existing} is a file, not a folder"
    return exc.strerror or str(exc)
