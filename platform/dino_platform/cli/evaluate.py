"""``dino eval --checkpoint URI --data URI``: distributed COCO evaluation; flags default to ``EvalConfig``."""
from __future__ import annotations

import argparse
import json
import sys

from dino_platform.errors import ConfigError
from dino_platform.evaluation.coco_eval import ENGINES, EvalConfig

EXAMPLE = """\
example:
  dino eval --checkpoint runs/coco-ft/checkpoint_step0000100 --data s3://bucket/shards/val --workers 2
  dino eval --checkpoint checkpoint0011_4scale.pth --preset dino_r50_4scale --num-classes 91 --data DIR

Prints AP, AP50, AP75, APs/m/l and per-class AP (dataset category ids); --out writes the COCO eval JSON.
Protocol: the official DINO one by default (every num_select detection is scored; COCOeval's maxDets
caps them per image per category); --detections-per-image 100 applies the COCO-challenge rule.
"""


def add_parser(sub) -> None:
    evaluate = sub.add_parser("eval", help="COCO AP of a checkpoint on a shard directory",
                              description="Distributed COCO evaluation of a platform or official checkpoint.",
                              epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint directory, model.pt, or official .pth")
    evaluate.add_argument("--data", required=True, help="evaluation shard directory (from `dino ingest`)")
    evaluate.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
    evaluate.add_argument("--batch-size", type=int, default=EvalConfig.batch_size,
                          help="images loaded per batch (default %(default)s)")
    evaluate.add_argument("--preset", help="dino_core preset (official checkpoints; platform ones record it)")
    evaluate.add_argument("--num-classes", type=int, help="class-head size = max category id + 1")
    evaluate.add_argument("--gpu", action="store_true", help="one GPU per worker")
    evaluate.add_argument("--detections-per-image", type=int, default=EvalConfig.detections_per_image, metavar="N",
                          help="keep the best N per image across classes (COCO-challenge rule: 100); "
                               "default: all num_select (official DINO protocol)")
    evaluate.add_argument("--max-dets", type=int, default=EvalConfig.max_dets,
                          help="COCOeval maxDets (per category; default %(default)s)")
    evaluate.add_argument("--engine", choices=ENGINES, default=EvalConfig.engine,
                          help="COCO evaluation engine (identical numbers; default %(default)s)")
    evaluate.add_argument("--out", help="write the COCO eval JSON here")
    evaluate.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> None:
    from dino_platform.evaluation.runner import run_evaluation

    if args.workers < 1:
        raise ConfigError(f"--workers: {args.workers} must be >= 1")
    try:
        config = EvalConfig(batch_size=args.batch_size, detections_per_image=args.detections_per_image,
                            max_dets=args.max_dets, engine=args.engine)
    except ConfigError as exc:  # name the flag: "max_dets: ..." -> "--max-dets: ..."
        name, _, rest = str(exc).partition(":")
        raise ConfigError(f"--{name.replace('_', '-')}:{rest}") from None
    model = {k: v for k, v in (("preset", args.preset), ("num_classes", args.num_classes)) if v is not None}
    result = run_evaluation(args.checkpoint, args.data, config, num_workers=args.workers, model=model or None,
                            use_gpu=args.gpu)
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
