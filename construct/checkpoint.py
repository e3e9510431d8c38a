"""Checkpoints as plain data: written atomically, read with weights-only unpickling."""

from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from construct.atomic import atomic_path
from construct.errors import CheckpointError

FORMAT = "construct-checkpoint-v1"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` via a temporary file and an atomic rename.

    A crash mid-write leaves the previous checkpoint intact (and at worst a stray ``.tmp``).
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save({"format": FORMAT, **state}, handle)
        handle.flush()
        os.fsync(handle.fileno())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ConStruct checkpoint; refuses pickled objects and files of other formats."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    state = read_weight_file(path, "checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ConStruct checkpoint (expected format '{FORMAT}')")
    return state


def read_weight_file(path: str | Path, what: str) -> Any:
    """Read a third-party weight file (.safetensors, or torch with weights-only unpickling).

    ``what`` names the file in errors ("CONCH checkpoint"): a pickled object, a corrupt or a
    truncated file each end in one CheckpointError line.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"cannot read {what} {path}: {unpickling_problem(exc)}") from exc
    except Exception as exc:  # corrupt or truncated files land here, whatever the reader raises
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot read {what} {path}: {type(exc).__name__}: {reason}") from exc


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def unpickling_problem(exc: BaseException) -> str:
    """One line saying why ``torch.load(..., weights_only=True)`` raised an UnpicklingError.

    torch's own message is many lines of advice (with terminal colour codes) on how to load the
    file anyway; what matters to a user is whether the file carries a pickled object (and which)
    or is not a PyTorch file at all.
    """
    text = _ANSI.sub("", str(exc))
    found = _UNSUPPORTED_GLOBAL.search(text)
    if found:
        return (f"refused by weights-only loading: it holds a pickled Python object ({found.group(1)}), not just "
                "tensors and plain data; ConStruct does not unpickle arbitrary objects")
    detail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
    detail = (detail.strip().splitlines() or [type(exc).__name__])[0].strip()
    if detail.startswith(("Unsupported operand", "invalid load key")):
        return f"corrupt, truncated or not a PyTorch file ({detail})"
    return f"refused by weights-only loading: {detail}"


def backbone_fingerprint(module: torch.nn.Module) -> float:
    """A cheap checksum of frozen weights, to notice random backbones that differ between runs."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in module.parameters()))


def backbone_identity(student: torch.nn.Module, teacher: torch.nn.Module | None, student_checkpoint: str | None,
                      teacher_checkpoint: str | None) -> dict[str, str]:
    """What frozen weights a run used: the student's name, and per tower its checkpoint path or a
    checksum of random weights (the student's under its name: ``{"student": "conch", "conch": ...}``)."""
    name = student.name
    identity = {"student": name, name: student_checkpoint or f"random:{backbone_fingerprint(student):.6e}"}
    if teacher is not None:
        identity["teacher"] = teacher_checkpoint or f"random:{backbone_fingerprint(teacher):.6e}"
    return identity


def check_student(checkpoint: dict[str, Any], student: str, path: str | Path) -> None:
    """Refuse a checkpoint trained on another student (model.student.name) before anything is built;
    checkpoints written before students could be chosen were all trained on CONCH."""
    saved = checkpoint.get("backbones", {}).get("student", "conch")
    if saved != student:
        raise CheckpointError(f"{path}: was trained with the {saved} student, this config gives {student} "
                              f"(model.student.name: {saved} evaluates it)")


def check_backbones(checkpoint: dict[str, Any], identity: dict[str, str], path: str | Path) -> None:
    """Refuse a checkpoint trained on other frozen weights than the ones built now."""
    check_student(checkpoint, identity["student"], path)
    saved_identity = checkpoint.get("backbones", {})
    for name, current in identity.items():
        saved = saved_identity.get(name)
        if name != "student" and saved is not None and not _same_backbone(saved, current):
            raise CheckpointError(f"{path}: was trained with {name} backbone '{saved}', this config gives '{current}'")


def _same_backbone(saved: str, current: str) -> bool:
    if saved.startswith("random:") and current.startswith("random:"):
        return math.isclose(float(saved[7:]), float(current[7:]), rel_tol=1e-5)
    # Paths may legitimately move between machines; only random-vs-real is a real mismatch.
    return saved.startswith("random:") == current.startswith("random:")


def check_classes(checkpoint: dict[str, Any], names: tuple[str, ...] | list[str], path: str | Path) -> None:
    """Refuse a checkpoint trained for another class set than the config's (names and order)."""
    saved = checkpoint.get("classes")
    if saved is not None and list(saved) != list(names):
        raise CheckpointError(f"{path}: was trained for classes [{', '.join(saved)}], "
                              f"the config gives [{', '.join(names)}]")


STAGES = {1: "stage-1 ConStruct checkpoint (main.py, construct-train)",
          2: "stage-2 segmenter checkpoint (construct-train-seg)"}
"""What writes each stage's checkpoints; a checkpoint without a 'stage' entry is stage 1."""


def checkpoint_stage(checkpoint: dict[str, Any]) -> int:
    """1 (the CAM model) or 2 (the segmenter trained on its pseudo-masks)."""
    return int(checkpoint.get("stage", 1))


def require_stage(checkpoint: dict[str, Any], stage: int, path: str | Path, wanted_by: str) -> None:
    """One CheckpointError line when ``checkpoint`` is of the other stage than ``wanted_by`` needs."""
    found = checkpoint_stage(checkpoint)
    if found != stage:
        raise CheckpointError(f"{path}: is a {STAGES.get(found, f'stage-{found} checkpoint')}; "
                              f"{wanted_by} needs a {STAGES[stage]}")
