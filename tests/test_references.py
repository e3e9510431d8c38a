"""Every reference in the repository leads somewhere inside it: `method.md §N` citations name a
section of docs/method.md, relative Markdown links name files that exist, and no file names a
path beside or above the checkout."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from support import REPO

CITATION = re.compile(r"method\.md §(\d+(?:\.\d+)?)(?:[–-](\d+(?:\.\d+)?))?")
LINK = re.compile(r"\]\(([^)\s]+)\)")
OUTSIDE = re.compile(r"\.\./shared|shared/docs|shared/seed|shared/fixtures")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    suffixes = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".sh", ""}
    paths = [REPO / name for name in names if Path(name).suffix in suffixes]
    return [path for path in paths if path.is_file() and path.name != "conch_state_dict_keys.txt"]


def method_sections() -> set[str]:
    text = (REPO / "docs" / "method.md").read_text(encoding="utf-8")
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\. ", text, flags=re.M)) | set(re.findall(r"^### (\d+\.\d+) ", text, flags=re.M))


def citations(text: str) -> list[str]:
    found = []
    for match in CITATION.finditer(text):
        found.extend(section for section in match.groups() if section)
    return found


def test_citation_parser_reads_single_sections_and_ranges() -> None:
    assert citations("see method.md §9.1 and (method.md §4–6)") == ["9.1", "4", "6"]


def test_every_method_citation_names_an_existing_section() -> None:
    sections = method_sections()
    assert {"1", "7", "9", "9.1", "9.2", "9.3", "10"} <= sections
    missing = {f"{path.relative_to(REPO)}: §{section}" for path in tracked_text_files()
               for section in citations(path.read_text(encoding="utf-8")) if section not in sections}
    assert not missing, sorted(missing)


def test_every_relative_markdown_link_exists() -> None:
    broken = []
    for path in tracked_text_files():
        if path.suffix != ".md":
            continue
        for target in LINK.findall(path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # web addresses and anchors within the page
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_no_file_names_a_path_outside_the_repository() -> None:
    offending = [str(path.relative_to(REPO)) for path in tracked_text_files()
                 if path.name not in ("test_references.py", "test_standalone.py") and OUTSIDE.search(path.read_text(encoding="utf-8"))]
    assert not offending, offending
