"""The command line shared by the entry scripts in ``pipelines/`` (each passes its own YAML as default)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

EPILOG = """\
examples:
  python pipelines/o365_pretrain_coco_ft.py --preset smoke
  python pipelines/o365_pretrain_coco_ft.py --set output_root=s3://bucket/p --set stages.pretrain.resources.workers=32
  ray job submit --working-dir . --runtime-env clusters/job_runtime_env.yaml -- \\
      python pipelines/o365_pretrain_coco_ft.py --spec pipelines/o365_pretrain_coco_ft.yaml
  python pipelines/coco_eval.py --check            # validate the spec and print the stages, run nothing

Re-running skips finished stages whose config and inputs are unchanged; an interrupted training
stage continues from its last checkpoint. State: <output_root>/pipeline_state.json.
"""


def build_parser(default_spec: Optional[Path]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run a declarative DINO pipeline (ingest, train, evaluate, register, predict) on Ray.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(default_spec) if default_spec else None, required=default_spec is None,
                        help=f"pipeline YAML (default {default_spec})")
    parser.add_argument("--preset", help="a preset defined in the spec's presets section, e.g. smoke")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. stages.finetune.schedule.max_steps=100 (repeatable)")
    parser.add_argument("--check", action="store_true", help="validate the spec and print the plan; run nothing")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Optional[List[str]] = None, default_spec: Optional[Path] = None) -> int:
    args = build_parser(default_spec).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dino_platform.errors import UserError
    from dino_platform.pipeline.spec import load_spec

    try:
        spec = load_spec(args.spec, preset=args.preset, overrides=args.overrides)
        if args.check:
            print(f"{spec.source}: valid; output root {spec.output_root}; stages in order:")
            for name, stage in spec.stages.items():
                print(f"  {name} ({stage.kind})")
            return 0
        from dino_platform.pipeline.runner import run_pipeline

        result = run_pipeline(spec)
    except UserError as exc:
        print(f"pipeline: error: {exc}", file=sys.stderr)
        return 2
    print(result.summary(), flush=True)
    return 0
