"""``dino synth`` and ``dino ingest``."""
from __future__ import annotations

import argparse
import json


SYNTH_EXAMPLE = """example:
  dino synth --kind o365 --out data/o365 --images 200 --seed 0
  dino synth --kind coco --out s3://bucket/raw/coco --images 100 --size 320 240

Writes OUT/images/... (JPEG) and OUT/annotations.json (COCO-style). o365: the 365 Objects365
categories, images in patchN/ folders; coco: the 80 COCO categories with COCO's ids (1..90).
Then: dino ingest --format o365 --annotations data/o365/annotations.json --images data/o365/images --out ...
"""

INGEST_EXAMPLE = """example:
  dino ingest --format coco --annotations coco/annotations/instances_val2017.json \\
      --images coco/val2017 --out s3://bucket/shards/coco-val --shard-size 512
  dino ingest --format o365 --annotations s3://raw/o365/zhiyuan_objv2_val.json \\
      --images s3://raw/o365/val --out s3://bucket/shards/o365-val

URIs are local paths, file:///abs/path or s3://bucket/prefix (S3 settings from the AWS_*
variables and ~/.aws, e.g. AWS_ENDPOINT_URL for MinIO). Bad images and annotations are
quarantined, counted and listed in OUT/manifest.json; re-running an interrupted ingest
finishes it with identical shards.
"""


def _synth(args: argparse.Namespace) -> None:
    from dino_platform.data.synth import SynthConfig, generate

    counts = generate(SynthConfig(kind=args.kind, images=args.images, seed=args.seed, size=tuple(args.size)), args.out)
    out = args.out.rstrip("/")
    print(json.dumps({"annotations": f"{out}/annotations.json", "images": f"{out}/images", **counts}))


def _ingest(args: argparse.Namespace) -> None:
    from dino_platform.data.ingest import IngestConfig, ingest

    manifest = ingest(IngestConfig(format=args.format, annotations_uri=args.annotations,
                                   images_uri=args.images, out_uri=args.out,
                                   shard_size=args.shard_size, parallel=not args.no_ray,
                                   stall_timeout_s=args.stall_timeout_s))
    print(json.dumps({"out": args.out, "images": manifest.images, "annotations": manifest.annotations,
                      "shards": len(manifest.shards), "quarantined": len(manifest.quarantined),
                      "quarantined_by_reason": manifest.stats.get("quarantined_by_reason", {}),
                      "digest": manifest.digest}))


def add_parser(sub) -> None:
    synth = sub.add_parser("synth", help="write a small synthetic Objects365- or COCO-like dataset",
                           description="Write a small, deterministic, real-looking detection dataset "
                                       "(JPEGs + COCO-style JSON) for demos and tests.",
                           epilog=SYNTH_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    synth.add_argument("--kind", choices=("o365", "coco"), required=True, help="label space and layout")
    synth.add_argument("--out", required=True, help="output directory URI")
    synth.add_argument("--images", type=int, required=True, help="number of images")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"),
                       help="nominal image size; each image varies by +-20%% (default 320 240)")
    synth.set_defaults(func=_synth)

    ingest = sub.add_parser("ingest", help="COCO/Objects365 JSON + images -> Parquet shards + manifest",
                            description="Read a COCO-style annotation file and its images and write "
                                        "Parquet shards plus manifest.json.",
                            epilog=INGEST_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ingest.add_argument("--format", choices=("coco", "o365"), required=True, help="source dataset flavour")
    ingest.add_argument("--annotations", required=True, help="URI of the annotation JSON")
    ingest.add_argument("--images", required=True, help="URI of the folder holding the images")
    ingest.add_argument("--out", required=True, help="URI of the shard directory to write")
    ingest.add_argument("--shard-size", type=int, default=512, help="images per shard (default 512)")
    ingest.add_argument("--stall-timeout-s", type=float, default=600.0,
                        help="fail with a report of where it waits when no shard finishes for this long (default 600)")
    ingest.add_argument("--no-ray", action="store_true",
                        help="build shards one after another in this process instead of as Ray tasks")
    ingest.set_defaults(func=_ingest)
