"""Check a dataset before training: ``construct-check-data --config configs/bcss.yaml``.

Reads every train label, tile header and val/test mask of the config's dataset once (what
training does before it builds the model), prints the dataset summary and lists every problem,
one line per file. Exit status 0 when the data is usable, 2 when it is not.
"""

from __future__ import annotations

import argparse

from construct.cli import run_cli
from construct.config import load_config
from construct.data.check import check_config_data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Check a dataset as training will read it: every train label (file names or data.label_csv), "
        "every tile's header (size, mode, bit depth), every val/test mask (mode, size, class values). Prints tiles "
        "per split, tile sizes, positives per class, labels per tile and mask pixel shares, then every problem "
        "as one line naming the file.")
    parser.add_argument("--config", required=True, help="YAML config (its data section and model.image_size are read)")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. data.root=/data/BCSS-WSSS")
    parser.add_argument("--splits", nargs="+", choices=("train", "val", "test"), default=["train", "val", "test"],
                        help="splits to check (default: all three; all must exist)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return parser


def main(args: argparse.Namespace) -> None:
    config = load_config(args.config, args.opts)
    report = check_config_data(config, args.splits, optional=())
    print(report.summary())
    report.raise_if_problems()
    print("data check passed")


def cli() -> None:
    run_cli(main, build_parser())


if __name__ == "__main__":
    cli()
