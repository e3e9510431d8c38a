"""Generate the config reference (docs/config.md) from the config dataclasses themselves.

Each key's line comes from its type annotation, its default and the docstring that follows the
field in construct/config.py, so the reference cannot drift from the code (a test checks it).
Run ``python -m construct_lab.config_reference`` to rewrite docs/config.md.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import typing

from construct import config as config_module
from construct_lab.paths import REPO

OUTPUT = REPO / "docs" / "config.md"


def _field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under each field of a dataclass (``name: type = x`` then ``\"\"\"doc\"\"\"``)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _nested_dataclass(tp: object) -> type | None:
    candidates = [tp, *typing.get_args(tp)]
    for candidate in candidates:
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _type_text(tp: object) -> str:
    text = str(tp).replace("typing.", "").replace("construct.config.", "").replace("<class '", "").replace("'>", "")
    return text.replace(" | ", " or ")


def _rows(cls: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        nested = _nested_dataclass(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if typing.get_origin(hints[f.name]) is list and nested is not None:  # a list of sections (data.classes)
            rows.append(f"| `{key}` | list of {nested.__name__} | `{default!r}` | {docs.get(f.name, '').replace('|', '/')} |")
            rows.extend(_rows(nested, key + "[i]."))
            continue
        if required:
            rows.append(f"| `{key}` | {_type_text(hints[f.name])} | required | {docs.get(f.name, '').replace('|', '/')} |")
            continue
        if nested is not None and default is not None:
            rows.extend(_rows(nested, key + "."))
            continue
        if nested is not None:  # an optional section, off by default
            doc = docs.get(f.name) or " ".join((inspect.getdoc(nested) or "").split())
            rows.append(f"| `{key}` | {nested.__name__} or null | `null` | {doc} |")
            rows.extend(_rows(nested, key + "."))
            continue
        shown = repr(default).replace("|", "\\|")
        rows.append(f"| `{key}` | {_type_text(hints[f.name])} | `{shown}` | {docs.get(f.name, '').replace('|', '/')} |")
    return rows


def render() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from `construct/config.py` by `python -m construct_lab.config_reference`; do not edit by hand.",
        "Every key is read by the code; an unknown key is an error. Override any key on the command line",
        "with `--opts key=value` (values parsed as YAML). A config may start with `_base_: other.yaml`",
        "to inherit another file and change only some keys.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
        *_rows(config_module.Config, ""),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=f"Regenerate the config reference ({OUTPUT.relative_to(OUTPUT.parents[1])}) from the config dataclasses.")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    if args.check:
        current = OUTPUT.is_file() and OUTPUT.read_text(encoding="utf-8") == render()
        print(f"{OUTPUT}: {'up to date' if current else 'out of date (run python -m construct_lab.config_reference)'}")
        return 0 if current else 1
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
