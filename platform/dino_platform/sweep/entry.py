"""The command line of ``pipelines/sweep_coco_ft.py`` (and any sweep spec)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

EPILOG = """\
examples:
  python pipelines/sweep_coco_ft.py --preset smoke
  python pipelines/sweep_coco_ft.py --set output_root=s3://bucket/sweeps --set budget.num_samples=32
  python pipelines/sweep_coco_ft.py --check

Re-running the same command resumes an interrupted sweep (Tuner.restore on <output_root>/<name>).
"""


def main(argv: Optional[List[str]] = None, default_spec: Optional[Path] = None) -> int:
    parser = argparse.ArgumentParser(description="Ray Tune sweep over DINO training; registers the best trial.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(default_spec) if default_spec else None, required=default_spec is None,
                        help=f"sweep YAML (default {default_spec})")
    parser.add_argument("--preset", help="a preset of the spec, e.g. smoke")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. budget.num_samples=8 (repeatable)")
    parser.add_argument("--check", action="store_true", help="validate the spec and print the search space; run nothing")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dino_platform.errors import UserError
    from dino_platform.sweep.spec import load_sweep_spec
    from dino_platform.sweep.tuner import SweepInterrupted, run_sweep

    try:
        spec = load_sweep_spec(args.spec, preset=args.preset, overrides=args.overrides)
        if args.check:
            print(f"{spec.source}: valid; sweep dir {spec.sweep_dir}; {spec.budget.num_samples} trials, "
                  f"{spec.scheduler.kind} on {spec.scheduler.metric}; search space:")
            for key, domain in spec.search_space.items():
                print(f"  {key}: {domain.kind} {list(domain.values)}")
            return 0
        outcome = run_sweep(spec)
    except UserError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    except SweepInterrupted as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return 130
    print(outcome.summary(), flush=True)
    return 0
