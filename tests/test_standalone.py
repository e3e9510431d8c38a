"""The project stands alone: no code refers to a path above the repository root, and the tests
do not depend on the working directory.

A user clones only this repository. A folder that happens to sit beside the checkout (as one did
during development) must never be read, so the source is scanned for paths that climb out of the
repository, and representative tests that read fixtures are run from another directory under an
audit hook that records every file opened beside the repository.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from support import REPO

SCANNED = [REPO / "main.py", *sorted((REPO / "construct").rglob("*.py")), *sorted((REPO / "construct_lab").rglob("*.py")),
           *sorted((REPO / "visualization_utils").rglob("*.py")), *sorted((REPO / "tests").rglob("*.py"))]


def _parent_steps(node: ast.AST) -> int | None:
    """How many directories ``node`` climbs from ``__file__``: ``Path(__file__)...parents[N]`` or ``.parent`` chains."""
    steps = 0
    while True:
        if isinstance(node, ast.Attribute) and node.attr == "parent":
            steps, node = steps + 1, node.value
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parents":
            if not (isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int)):
                return None
            steps, node = steps + node.slice.value + 1, node.value.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in {"resolve", "absolute"}:
            node = node.func.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Path" and node.args:
            node = node.args[0]
        elif isinstance(node, ast.Name) and node.id == "__file__":
            return steps
        else:
            return None


def escapes(source: str, relative_path: Path) -> list[str]:
    """Places in ``source`` (a file at ``relative_path`` in the repo) that point above the repository root."""
    depth = len(relative_path.parts)  # climbing `depth` directories from the file reaches the repo root
    problems = []
    for node in ast.walk(ast.parse(source)):
        steps = _parent_steps(node) if isinstance(node, ast.Attribute | ast.Subscript) else None
        if steps is not None and steps > depth:
            problems.append(f"line {node.lineno}: climbs {steps} levels from __file__ (the repo root is {depth} up)")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if "../" in text or "..\\" in text or "shared/fixtures" in text:
                problems.append(f"line {node.lineno}: path literal {text[:60]!r} leaves the repository")
    return problems


def test_no_source_refers_above_the_repository_root() -> None:
    found = {}
    for path in SCANNED:
        if path.name in ("test_standalone.py", "test_references.py"):
            continue  # these files name the patterns they look for
        relative = path.relative_to(REPO)
        problems = escapes(path.read_text(encoding="utf-8"), relative)
        if problems:
            found[str(relative)] = problems
    assert not found, found


@pytest.mark.parametrize("source", [
    "from pathlib import Path\nX = Path(__file__).resolve().parents[2] / 'shared'\n",
    "from pathlib import Path\nX = Path(__file__).parent.parent.parent / 'x'\n",
    "from pathlib import Path\nX = Path(__file__).resolve().parents[1].parent / 'fixtures'\n",
    "X = open('../shared/fixtures/keys.txt')\n",
])
def test_the_scan_catches_paths_that_climb_out(source: str) -> None:
    assert escapes(source, Path("tests") / "test_example.py")


def test_the_scan_allows_the_repository_root() -> None:
    source = "from pathlib import Path\nREPO = Path(__file__).resolve().parents[1]\nF = REPO / 'tests' / 'fixtures'\n"
    assert escapes(source, Path("tests") / "test_example.py") == []


AUDITED_RUN = """
import json, os, sys
from pathlib import Path
repo, report, watched = Path(sys.argv[1]), sys.argv[2], [Path(p) for p in json.loads(sys.argv[3])]
outside = []

def audit(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = Path(os.path.normpath(Path.cwd() / os.fsdecode(args[0])))
        if any(path.is_relative_to(folder) for folder in watched):
            outside.append(str(path))

sys.addaudithook(audit)
import pytest
code = pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", str(repo), *sys.argv[4:]])
Path(report).write_text(json.dumps({"exit": int(code), "outside": sorted(set(outside))}))
"""


def folders_beside_the_repository() -> list[Path]:
    """Siblings of the checkout (where a stray ``../shared`` would be), minus those that hold
    Python itself, the temporary directory or the home directory."""
    needed = [Path(p).resolve() for p in (sys.prefix, sys.base_prefix, tempfile.gettempdir(), Path.home())]
    return [entry for entry in REPO.parent.iterdir()
            if entry.resolve() != REPO and not any(p.is_relative_to(entry.resolve()) for p in needed)]


def test_fixture_tests_pass_from_another_directory_reading_nothing_beside_the_repo(tmp_path) -> None:
    """The tests that read fixtures, run with the working directory outside the repository."""
    report = tmp_path / "report.json"
    selected = [str(REPO / "tests" / "test_conch.py") + "::test_state_dict_matches_reference_layout",
                str(REPO / "tests" / "test_inference.py") + "::test_crf_moves_noisy_labels_toward_clean_ones"]
    watched = json.dumps([str(folder) for folder in folders_beside_the_repository()])
    result = subprocess.run([sys.executable, "-c", AUDITED_RUN, str(REPO), str(report), watched, *selected],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert report.exists(), result.stdout + result.stderr
    outcome = json.loads(report.read_text())
    assert outcome["exit"] == 0, result.stdout[-3000:]
    assert outcome["outside"] == [], outcome["outside"]
