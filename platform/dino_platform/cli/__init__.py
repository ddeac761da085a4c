"""The ``dino`` console command: one entry point, one module of this package per group of sub-commands.

Each module exposes ``add_parser(subparsers)`` and imports what its commands drive only when one
runs, so ``dino --help`` stays fast; adding a command never means editing another command's code.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from dino_platform.errors import UserError
from dino_platform.spec_cli import setup_logging

# the modules of this package that add sub-commands, in --help order
COMMAND_MODULES: List[str] = [
    "data",      # dino synth, dino ingest
    "train",     # dino train
    "evaluate",  # dino eval
    "predict",   # dino predict, dino export
    "infer",     # dino infer
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino",
        description="dino-platform: DINO detection training and evaluation on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"dino_platform.cli.{name}").add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        args.func(args)  # a command returns nothing; it fails by raising
        return 0
    except KeyboardInterrupt:
        return 130
    except UserError as exc:  # user-facing errors: one clear line, not a traceback
        print(f"dino {args.command}: error: {exc}", file=sys.stderr)
        return 2

