"""The package layout is the architecture: the method's layers import downwards only, the user
commands sit on top of the library, the lab (construct_lab) on top of both and never imported by
them, there are no import circles, and every command-line entry point answers ``--help``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from support import ENTRY_POINTS, REPO

PACKAGES = (REPO / "construct", REPO / "construct_lab")

# Layers that must not reach up into the training engine or the applications.
LOWER_LAYERS = ("construct.models", "construct.data", "construct.losses", "construct.inference")
UPPER_LAYERS = ("construct.engine", "construct.commands", "construct.api", "construct_lab")



def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every construct module ``path`` imports, deferred (function-level) imports included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from construct.x import y`` may name a submodule y or a symbol of x
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("construct"):
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(path for package in PACKAGES for path in package.rglob("*.py"))
    known = {module_name(p) for p in paths}
    graph = {module_name(p): imported_modules(p, known) for p in paths}
    for name, targets in graph.items():
        # a package's __init__ importing its own submodules is not a layering fact
        targets.discard(name)
        targets -= {t for t in targets if t == "construct"}
    return graph


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_lower_layers_never_import_engine_or_tools() -> None:
    offending = [f"{src} -> {dst}" for src, dsts in import_graph().items() for dst in dsts
                 if any(within(src, low) for low in LOWER_LAYERS) and any(within(dst, up) for up in UPPER_LAYERS)]
    assert offending == []


def test_library_never_imports_the_lab() -> None:
    offending = [f"{src} -> {dst}" for src, dsts in import_graph().items() for dst in dsts
                 if not within(src, "construct_lab") and within(dst, "construct_lab")]
    assert offending == []


def test_library_never_imports_the_commands() -> None:
    offending = [f"{src} -> {dst}" for src, dsts in import_graph().items() for dst in dsts
                 if within(src, "construct") and not within(src, "construct.commands") and within(dst, "construct.commands")]
    assert offending == []


def test_no_synthetic_data_in_the_library() -> None:
    names = [path.name for path in (REPO / "construct").rglob("*.py")]
    assert not [name for name in names if "synthetic" in name or "painter" in name]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle() -> None:
    # An import of a package stands for the submodules its __init__ re-exports, so a child that
    # imports a sibling through the package is not counted as a circle through __init__.
    graph = import_graph()
    packages = {name for name in graph if (REPO / name.replace(".", "/") / "__init__.py").is_file()}
    resolved = {src: {t for d in dsts for t in (graph[d] if d in packages else {d}) if t != src}
                for src, dsts in graph.items() if src not in packages}
    assert find_cycle(resolved) is None


def test_cycle_finder_finds_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("command", ENTRY_POINTS, ids=lambda c: c[-1])
def test_entry_point_help(command: list[str]) -> None:
    result = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.lstrip().startswith("usage:")
    assert len(result.stdout.splitlines()) > 3
