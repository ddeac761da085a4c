"""``dino train CONFIG``."""
from __future__ import annotations

import argparse

TRAIN_EXAMPLE = """\
example:
  dino train job.yaml
  dino train job.yaml --set deepspeed.zero_stage=3 --set scaling.num_workers=4

job.yaml (every other field has the official-recipe default; see dino_platform/train/config.py):
  run:      {name: coco-ft, storage_path: s3://bucket/runs, max_failures: 2}
  data:     {train_uri: s3://bucket/shards/train, eval_uri: s3://bucket/shards/val}
  model:    {preset: dino_tiny, num_classes: 91}
  scaling:  {num_workers: 2, batch_size_per_worker: 2}
  deepspeed: {zero_stage: 2, precision: fp32}

Re-running the same job (same run.storage_path and run.name) resumes from its latest checkpoint.
MLflow: $MLFLOW_TRACKING_URI, else sqlite under <storage_path>/<name>/mlflow.db.
"""


def add_parser(sub) -> None:
    train = sub.add_parser("train", help="train a DINO model on Ray Train + DeepSpeed",
                           description="Train (or resume) a job described by a YAML config.",
                           epilog=TRAIN_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", help="YAML job config")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. optim.lr=2e-4 (repeatable)")
    train.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> None:
    from dino_platform.train.config import load_config
    from dino_platform.train.trainer import run_training

    outcome = run_training(load_config(args.config, overrides=args.overrides))
    print(f"run: {outcome.run_dir}")
    if outcome.worker_groups:
        sizes = " -> ".join(str(g["world_size"]) for g in outcome.worker_groups)
        print(f"worker groups: {outcome.restarts} restarts, {outcome.resizes} resizes (workers {sizes})")
    if outcome.checkpoint is not None:
        print(f"latest checkpoint: {outcome.checkpoint.path}")
    if outcome.tracking is not None:
        print(f"MLflow run: {outcome.tracking.run_id} ({outcome.tracking.tracking_uri})")
    for name in ("step", "loss", "eval/AP", "eval/AP50"):
        if outcome.metrics and name in outcome.metrics:
            print(f"{name}: {outcome.metrics[name]:.4g}")
