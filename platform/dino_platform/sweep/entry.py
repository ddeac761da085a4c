"""The command line of ``pipelines/sweep_coco_ft.py`` (and any sweep spec)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from dino_platform.spec_cli import setup_logging, spec_parser

EPILOG = """\
examples:
  python pipelines/sweep_coco_ft.py --preset smoke
  python pipelines/sweep_coco_ft.py --set output_root=s3://bucket/sweeps --set budget.num_samples=32
  python pipelines/sweep_coco_ft.py --check

Re-running the same command resumes an interrupted sweep (Tuner.restore on <output_root>/<name>).
"""


def main(argv: Optional[List[str]] = None, default_spec: Optional[Path] = None) -> int:
    parser = spec_parser("Ray Tune sweep over DINO training; registers the best trial.", EPILOG, default_spec,
                         "sweep", "budget.num_samples=8", "validate the spec and print the search space; run nothing")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
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
