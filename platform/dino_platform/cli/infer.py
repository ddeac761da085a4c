"""``dino infer``: offline batch inference over a bucket prefix of images or a shard directory."""
from __future__ import annotations

import argparse
from dataclasses import fields

from dino_platform.cli.model_source import MODEL_HELP, add_model_options

INFER_EXAMPLE = """\
example:
  dino infer --model models:/dino-coco@champion --images s3://bucket/raw/imgs/ --out s3://bucket/dets/run1
  dino infer --model runs/x/checkpoint_step0000100 --shards s3://bucket/shards/val --out dets/ \\
      --threshold 0.05 --concurrency 4 --batch-size 8 --coco-json

Writes OUT/part-NNNNN.parquet (columns file, image_id, width, height, boxes [x0 y0 x1 y1 px],
scores, labels, label_names; one row per readable image) and OUT/manifest.json (model URI and
version, threshold, counts, unreadable images with their reasons, digest). Re-running the same
command skips the parts already written (resume after a kill). Decoding runs in Ray Data CPU
tasks, the model in --concurrency actors (one GPU each when the cluster has GPUs).
Ray: the cluster of $RAY_ADDRESS, else a local instance.
"""


def add_parser(sub) -> None:
    infer = sub.add_parser("infer", help="batch inference over a bucket of images or shards (Ray Data)",
                           description="Detections for every image of a prefix or shard directory, as Parquet.",
                           epilog=INFER_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    infer.add_argument("--model", required=True, help=MODEL_HELP)
    source = infer.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="prefix (local or s3://) whose image files are read")
    source.add_argument("--shards", help="shard directory written by `dino ingest`")
    infer.add_argument("--out", required=True, help="output directory or s3:// prefix")
    infer.add_argument("--threshold", type=float, default=0.05, help="keep detections scoring at least this "
                                                                     "(default 0.05)")
    infer.add_argument("--concurrency", type=int, default=1, help="model actors (default 1)")
    infer.add_argument("--batch-size", type=int, default=4, help="images per actor call (default 4)")
    infer.add_argument("--part-size", type=int, default=256, help="images per output file, --images only "
                                                                  "(default 256)")
    infer.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per actor (default 1)")
    infer.add_argument("--gpu", dest="use_gpu", action="store_true", default=None,
                       help="one GPU per actor (default: when the cluster has GPUs)")
    infer.add_argument("--cpu", dest="use_gpu", action="store_false", help="CPU actors even on a GPU cluster")
    infer.add_argument("--coco-json", action="store_true", help="also write OUT/coco_results.json")
    infer.add_argument("--stall-timeout-s", type=float, default=600.0,
                       help="fail with a report of where it waits when no batch arrives for this long (default 600)")
    add_model_options(infer)
    infer.set_defaults(func=_infer)


def _infer(args: argparse.Namespace) -> None:
    from dino_platform.serving.infer import InferConfig, run_inference

    flags = {f.name: getattr(args, f.name) for f in fields(InferConfig) if hasattr(args, f.name)}  # same names
    manifest = run_inference(InferConfig(**flags))
    counts = manifest["counts"]
    print(f"{counts['images']} images, {counts['detections']} detections, {counts['failed']} unreadable, "
          f"{counts['parts']} parts; digest {manifest['digest']}")
    for item in manifest["failed"]:
        print(f"  unreadable: {item['file']}: {item['reason']}")
