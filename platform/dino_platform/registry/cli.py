"""``dino predict``: run a registered model (or a checkpoint) on images; PNGs with boxes + a JSON."""
from __future__ import annotations

import argparse

PREDICT_EXAMPLE = """\
example:
  export MLFLOW_TRACKING_URI=sqlite:///$PWD/runs/o365_pretrain_coco_ft_smoke/mlflow.db
  dino predict --model models:/dino-coco@champion street.jpg kitchen.png --out predictions/
  dino predict --model runs/x/train/finetune-1a2b/checkpoint_step0000008 img.jpg --threshold 0.5
  dino predict --model checkpoint0011_4scale.pth --preset dino_r50_4scale --num-classes 91 img.jpg

Writes OUT/<image name>.png (boxes with score >= --threshold, labelled 'name 0.87') and
OUT/detections.json (every detection up to --max-detections, boxes in original pixels x0 y0 x1 y1).
Images and --out may be local paths or s3:// URIs.
"""


def add_parser(sub) -> None:
    predict = sub.add_parser("predict", help="detect objects in images with a registered model or checkpoint",
                             description="Run a DINO model on images; write drawn PNGs and a JSON of detections.",
                             epilog=PREDICT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files or URIs")
    predict.add_argument("--model", required=True,
                         help="models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint directory, model.pt or .pth")
    predict.add_argument("--out", default="predictions", help="output directory (default ./predictions)")
    predict.add_argument("--threshold", type=float, default=0.3, help="draw boxes scoring at least this (default 0.3)")
    predict.add_argument("--max-detections", type=int, default=100, help="detections kept per image (default 100)")
    predict.add_argument("--max-drawn", type=int, help="draw at most this many boxes per image (default: all above "
                                                       "--threshold)")
    predict.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default $MLFLOW_TRACKING_URI)")
    predict.add_argument("--preset", help="dino_core preset, for official .pth files")
    predict.add_argument("--num-classes", type=int, help="class-head size, for official .pth files")
    predict.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                         help="an image that cannot be decoded or transformed: stop (default) or leave it out "
                              "and list it in detections.json")
    predict.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    from dino_platform.errors import ConfigError
    from dino_platform.registry.predict import load_detector, predict_to_directory
    from dino_platform.storage import resolve

    if not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold: {args.threshold} must be in [0, 1]")
    if args.max_detections < 1:
        raise ConfigError(f"--max-detections: {args.max_detections} must be >= 1")
    images = [(uri.rstrip("/").rsplit("/", 1)[-1], resolve(uri).read_bytes()) for uri in args.images]
    detector = load_detector(args.model, tracking_uri=args.tracking_uri, preset=args.preset,
                             num_classes=args.num_classes)
    if args.max_drawn is not None and args.max_drawn < 1:
        raise ConfigError(f"--max-drawn: {args.max_drawn} must be >= 1")
    document = predict_to_directory(detector, images, args.out, threshold=args.threshold,
                                    max_detections=args.max_detections, max_drawn=args.max_drawn,
                                    on_error=args.on_error)
    for item in document["images"]:
        drawn = sum(d["drawn"] for d in item["detections"])
        print(f"{item['png']}  ({drawn} boxes >= {args.threshold})")
    for item in document["skipped"]:
        print(f"skipped {item['file']}: {item['error']}")
    print(document["json"])
    return 0
