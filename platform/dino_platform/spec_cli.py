"""What the spec-driven entry scripts share: ``--spec/--preset/--set/--check/-v`` and the log format.

``pipelines/*.py`` (pipeline specs) and ``pipelines/sweep_*.py`` (sweep specs) take the same flags;
only the description, the examples and what ``--check`` prints differ.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT)


def spec_parser(description: str, epilog: str, default_spec: Optional[Path], kind: str, set_example: str,
                check_help: str) -> argparse.ArgumentParser:
    """``kind``: what the YAML holds (``pipeline``, ``sweep``); ``set_example``: a ``KEY=VALUE`` for --help."""
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(default_spec) if default_spec else None, required=default_spec is None,
                        help=f"{kind} YAML (default {default_spec})")
    parser.add_argument("--preset", help="a preset defined in the spec's presets section, e.g. smoke")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a spec field, e.g. {set_example} (repeatable)")
    parser.add_argument("--check", action="store_true", help=check_help)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser
