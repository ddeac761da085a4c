"""The command line shared by the entry scripts in ``pipelines/`` (each passes its own YAML as default)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from dino_platform.spec_cli import setup_logging, spec_parser

EPILOG = """\
examples:
  python pipelines/o365_pretrain_coco_ft.py --preset smoke
  python pipelines/o365_pretrain_coco_ft.py --set output_root=s3://bucket/p --set stages.pretrain.config.scaling.num_workers=32
  ray job submit --working-dir . --runtime-env clusters/job_runtime_env.yaml -- \\
      python pipelines/o365_pretrain_coco_ft.py --spec pipelines/o365_pretrain_coco_ft.yaml
  python pipelines/coco_eval.py --check            # validate the spec and print the stages, run nothing

Re-running skips finished stages whose config and inputs are unchanged; an interrupted training
stage continues from its last checkpoint. State: <output_root>/pipeline_state.json.
"""


def build_parser(default_spec: Optional[Path]) -> argparse.ArgumentParser:
    return spec_parser("Run a declarative DINO pipeline (ingest, train, evaluate, register, predict) on Ray.",
                       EPILOG, default_spec, "pipeline", "stages.finetune.config.optim.max_steps=100",
                       "validate the spec and print the plan; run nothing")


def main(argv: Optional[List[str]] = None, default_spec: Optional[Path] = None) -> int:
    args = build_parser(default_spec).parse_args(argv)
    setup_logging(args.verbose)
    from dino_platform.errors import UserError
    from dino_platform.pipeline.loader import load_spec

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
