"""``dino train CONFIG`` and ``dino eval --checkpoint URI --data URI``."""
from __future__ import annotations

import argparse
import json
import sys

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

EVAL_EXAMPLE = """\
example:
  dino eval --checkpoint runs/coco-ft/checkpoint_step0000100 --data s3://bucket/shards/val --workers 2
  dino eval --checkpoint checkpoint0011_4scale.pth --preset dino_r50_4scale --num-classes 91 --data DIR

Prints AP, AP50, AP75, APs/m/l and per-class AP (dataset category ids); --out writes the COCO eval JSON.
Protocol: the official DINO one by default (every num_select detection is scored; COCOeval's maxDets
caps them per image per category); --detections-per-image 100 applies the COCO-challenge rule.
"""


def add_parser(sub) -> None:
    train = sub.add_parser("train", help="train a DINO model on Ray Train + DeepSpeed",
                           description="Train (or resume) a job described by a YAML config.",
                           epilog=TRAIN_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", help="YAML job config")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. optim.lr=2e-4 (repeatable)")
    train.set_defaults(func=_train)

    evaluate = sub.add_parser("eval", help="COCO AP of a checkpoint on a shard directory",
                              description="Distributed COCO evaluation of a platform or official checkpoint.",
                              epilog=EVAL_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint directory, model.pt, or official .pth")
    evaluate.add_argument("--data", required=True, help="evaluation shard directory (from `dino ingest`)")
    evaluate.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
    evaluate.add_argument("--batch-size", type=int, default=2, help="images loaded per batch (default 2)")
    evaluate.add_argument("--preset", help="dino_core preset (official checkpoints; platform ones record it)")
    evaluate.add_argument("--num-classes", type=int, help="class-head size = max category id + 1")
    evaluate.add_argument("--gpu", action="store_true", help="one GPU per worker")
    evaluate.add_argument("--detections-per-image", type=int, default=None, metavar="N",
                          help="keep the best N per image across classes (COCO-challenge rule: 100); "
                               "default: all num_select (official DINO protocol)")
    evaluate.add_argument("--max-dets", type=int, default=100, help="COCOeval maxDets (per category; default 100)")
    evaluate.add_argument("--engine", choices=("faster_coco_eval", "pycocotools"), default="faster_coco_eval",
                          help="COCO evaluation engine (identical numbers; default faster_coco_eval)")
    evaluate.add_argument("--out", help="write the COCO eval JSON here")
    evaluate.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from dino_platform.train.config import load_config
    from dino_platform.train.trainer import run_training

    cfg = load_config(args.config, overrides=args.overrides)
    outcome = run_training(cfg)
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
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dino_platform.errors import ConfigError
    from dino_platform.evaluation.runner import run_evaluation

    if args.workers < 1 or args.batch_size < 1:
        raise ConfigError("--workers and --batch-size must be >= 1")
    model = {}
    if args.preset:
        model["preset"] = args.preset
    if args.num_classes is not None:
        model["num_classes"] = args.num_classes
    result = run_evaluation(args.checkpoint, args.data, num_workers=args.workers, batch_size=args.batch_size,
                            model=model or None, use_gpu=args.gpu, detections_per_image=args.detections_per_image,
                            max_dets=args.max_dets, engine=args.engine)
    stats = result["stats"]
    print(f"protocol {result['protocol']['key']} (engine {result['protocol']['engine']})")
    print("  ".join(f"{k} {stats[k]:.4f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
    for row in result["per_class"]:
        if row["AP"] is not None:  # classes without ground truth in this data have no AP
            print(f"  class {row['category_id']:>4} {row['name']:<24} AP {row['AP']:.4f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
