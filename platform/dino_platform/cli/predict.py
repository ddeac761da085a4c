"""``dino predict``: run a registered model, a checkpoint or an ONNX export on images (PNGs with boxes
+ a JSON); ``dino export``: write a model as a size-independent ONNX graph."""
from __future__ import annotations

import argparse

from dino_platform.cli.model_source import MODEL_HELP, add_model_options
from dino_platform.errors import ConfigError

PREDICT_EXAMPLE = """\
example:
  export MLFLOW_TRACKING_URI=sqlite:///$PWD/runs/o365_pretrain_coco_ft_smoke/mlflow.db
  dino predict --model models:/dino-coco@champion street.jpg kitchen.png --out predictions/
  dino predict --model runs/x/train/finetune-1a2b/checkpoint_step0000008 img.jpg --threshold 0.5
  dino predict --model checkpoint0011_4scale.pth --preset dino_r50_4scale --num-classes 91 img.jpg
  dino predict --onnx dino.onnx street.jpg          # onnxruntime only (a file from `dino export`)

Writes OUT/<image name>.png (boxes with score >= --threshold, labelled 'name 0.87') and
OUT/detections.json (every detection up to --max-detections, boxes in original pixels x0 y0 x1 y1).
Images and --out may be local paths or s3:// URIs.
"""


def add_parser(sub) -> None:
    predict = sub.add_parser("predict", help="detect objects in images with a registered model or checkpoint",
                             description="Run a DINO model on images; write drawn PNGs and a JSON of detections.",
                             epilog=PREDICT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files or URIs")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help=MODEL_HELP)
    source.add_argument("--onnx", metavar="FILE", help="a .onnx file written by `dino export`, run with onnxruntime")
    predict.add_argument("--out", default="predictions", help="output directory (default ./predictions)")
    predict.add_argument("--threshold", type=float, default=0.3, help="draw boxes scoring at least this (default 0.3)")
    predict.add_argument("--max-detections", type=int, default=100, help="detections kept per image (default 100)")
    predict.add_argument("--max-drawn", type=int, help="draw at most this many boxes per image (default: all above "
                                                       "--threshold)")
    add_model_options(predict)
    predict.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                         help="an image that cannot be decoded or transformed: stop (default) or leave it out "
                              "and list it in detections.json")
    predict.set_defaults(func=_predict)

    export = sub.add_parser("export", help="export a registered model or checkpoint to ONNX (any image size)",
                            description="Export a DINO model to a self-contained ONNX file that runs at any batch "
                                        "size and image size with onnxruntime.",
                            epilog=EXPORT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("--model", required=True, help=MODEL_HELP)
    export.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default onnx)")
    export.add_argument("--out", required=True, help="the file to write, e.g. dino.onnx")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 16 (default 17)")
    export.add_argument("--with-postprocess", action="store_true",
                        help="add a target_sizes input and scores/labels/boxes outputs (top-num_select, pixels)")
    export.add_argument("--height", type=int, default=512, help="example input height used to trace (default 512)")
    export.add_argument("--width", type=int, default=512, help="example input width used to trace (default 512)")
    add_model_options(export)
    export.set_defaults(func=_export)


EXPORT_EXAMPLE = """\
example:
  dino export --model models:/dino-coco@champion --format onnx --out dino.onnx --with-postprocess
  dino export --model checkpoint0011_4scale.pth --preset dino_r50_4scale --num-classes 91 --out r50.onnx
  dino predict --onnx dino.onnx street.jpg

The graph is dynamic in batch, height and width (--height/--width only pick the traced example).
Inputs: images [B,3,H,W] float32 (normalised), mask [B,H,W] bool (True on padding)
        (+ target_sizes [B,2] int64 (h, w) with --with-postprocess).
Outputs: pred_logits [B,nq,K], pred_boxes [B,nq,4] (cx,cy,w,h in 0..1)
        (+ scores [B,k], labels [B,k], boxes [B,k,4] x0 y0 x1 y1 pixels with --with-postprocess).
ResNet presets export; Swin presets do not yet (the command says why).
"""


def _export(args: argparse.Namespace) -> None:
    from dino_platform.serving.onnx import export_model

    if args.opset < 16:
        raise ConfigError(f"--opset: {args.opset}; the export needs opset >= 16")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ConfigError("dino export needs onnx and onnxruntime: pip install 'dino-platform[export]'") from None
    metadata = export_model(args.model, args.out, fmt=args.format, opset=args.opset,
                            with_postprocess=args.with_postprocess, height=args.height, width=args.width,
                            tracking_uri=args.tracking_uri, preset=args.preset, num_classes=args.num_classes)
    print(f"{args.out}  (inputs {', '.join(metadata['inputs'])}; outputs {', '.join(metadata['outputs'])})")


def _predict(args: argparse.Namespace) -> None:
    from dino_platform.model.artifact import load_artifact
    from dino_platform.serving.predict import predict_to_directory
    from dino_platform.storage import resolve

    if not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold: {args.threshold} must be in [0, 1]")
    if args.max_detections < 1:
        raise ConfigError(f"--max-detections: {args.max_detections} must be >= 1")
    images = [(uri.rstrip("/").rsplit("/", 1)[-1], resolve(uri).read_bytes()) for uri in args.images]
    if args.onnx:
        from dino_platform.serving.onnx import load_onnx_detector

        detector = load_onnx_detector(args.onnx)
    else:
        detector = load_artifact(args.model, tracking_uri=args.tracking_uri, preset=args.preset,
                                 num_classes=args.num_classes).detector()
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
