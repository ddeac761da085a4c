"""The ``dino`` console command: one entry point, one sub-command per module.

Each sub-command lives next to the code it drives and exposes ``add_parser(subparsers)``; this file
only lists them, so adding a command never means editing another command's code.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from dino_platform.spec_cli import setup_logging

# module path (relative to dino_platform) of each sub-command provider, in --help order
COMMAND_MODULES: List[str] = [
    "data.cli",       # dino synth, dino ingest
    "train.cli",      # dino train
    "evaluation.cli", # dino eval
    "registry.cli",   # dino predict
    "infer.cli",      # dino infer
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
        try:
            module = importlib.import_module(f"dino_platform.{name}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(f"dino_platform.{name.split('.')[0]}"):
                continue  # that part of the platform is not installed/built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # user-facing errors: one clear line, not a traceback
        from dino_platform.errors import UserError

        if isinstance(exc, UserError):
            print(f"dino {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
