"""Pretrain the testbed's tiny CONCH and tiny MiT offline, then print their premise measurements.

    python -m construct_lab.pretrain_tiny --out pretrained_models/testbed/seed0 --seed 0

Writes ``pytorch_model.bin`` (tiny CONCH, official key layout), ``mit/`` (tiny MiT, Hugging Face
folder) and ``testbed.json`` (seed, budget, premises) into ``--out``; a second run with the same
seed reuses them. configs/demo.yaml points at these files and pretrains them on first use (with
the default budget: a folder made with --budget overrides is not the one the demo expects).
``--budget painters=noise,glands`` pretrains without the classic painter (any subset of
construct_lab.synthetic.tiles.PAINTERS), so that the printed premises on the left-out painter measure
transfer to tissue drawn another way. What is trained on what, and why: construct_lab/testbed/pretrain.py.
"""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

from construct.classes import ClassSet
from construct.cli import run_cli
from construct.config import load_config
from construct.errors import ConfigError
from construct_lab.testbed.premises import format_premises
from construct_lab.testbed.pretrain import MANIFEST, Budget, ensure_testbed


def main(args: argparse.Namespace) -> None:
    budget = Budget()
    for text in args.budget:
        key, sep, value = text.partition("=")
        names = {f.name: f.type for f in fields(Budget)}
        if not sep or key not in names:
            raise ConfigError(f"--budget: expected KEY=VALUE with KEY one of {', '.join(names)}, got '{text}'")
        try:
            kind = {"float": float, "int": int}.get(getattr(names[key], "__name__", names[key]), str)
            budget = replace(budget, **{key: kind(value)})
        except ValueError:
            raise ConfigError(f"--budget: '{value}' is not a number for {key}") from None
    budget.painter_names()  # a bad painter list fails before anything is drawn
    prompts = list(ClassSet.from_config(load_config(args.config)).prompts)
    manifest = ensure_testbed(args.out, args.seed, prompts, budget)
    print(f"premises (held-out synthetic tiles; {args.out / MANIFEST}):")
    print(format_premises(manifest["premises"]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m construct_lab.pretrain_tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the pretrained towers (created)")
    parser.add_argument("--seed", type=int, default=0, help="pretraining seed (default 0)")
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"),
                        help="config whose class prompts the tiny CONCH learns (default: configs/demo.yaml)")
    parser.add_argument("--budget", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override the pretraining budget, e.g. conch_steps=20 (tests use a tiny one), or "
                             "painters=noise,glands to hold the classic painter out (transfer measurement)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser())
