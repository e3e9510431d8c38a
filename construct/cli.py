"""Shared command-line plumbing: device flags and one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from construct.errors import ConStructError, os_error_reason


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--gpu", type=int, metavar="N", help="run on CUDA device N (same as --device cuda:N)")
    group.add_argument("--device", metavar="DEV", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda:0 if available, else cpu)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")


def resolve_device(args: argparse.Namespace) -> torch.device:
    """The device named by --gpu/--device; CUDA asked for where there is none is an error."""
    if args.gpu is not None:
        name = f"cuda:{args.gpu}"
    elif args.device:
        name = args.device
    else:
        name = "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConStructError(f"--device: '{name}' is not a torch device (try cpu or cuda:0)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConStructError(f"{name} was requested but this machine has no usable CUDA device; use --device cpu")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ConStructError(f"{name} was requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        device = torch.device("cuda", index)
    return device


def run_cli(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser, argv: list[str] | None = None) -> None:
    """Parse arguments and run ``main``; user errors and file-system errors print one line and exit with status 2."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except ConStructError as exc:
        if getattr(args, "debug", False):
            raise
        message = str(exc).strip().replace("\n", " ")  # one line, whatever the message holds
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # the file system refused (an unwritable output folder, a full disk, ...)
        if getattr(args, "debug", False):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{os_error_reason(exc)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
