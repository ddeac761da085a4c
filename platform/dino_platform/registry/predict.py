"""Detections on individual images from a registered model or a checkpoint, drawn and as JSON.

    detector = load_detector("models:/dino-coco@champion", tracking_uri="sqlite:///runs/x/mlflow.db")
    written = predict_to_directory(detector, [("street.jpg", jpeg_bytes)], "predictions/", threshold=0.3)

Each image is resized as the model's evaluation transform does (short side, max size), run alone
(no padding, as in evaluation), and its boxes are mapped back to the original pixels.
"""
from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from dino_platform.errors import ConfigError, DataError

log = logging.getLogger("dino.predict")


@dataclass
class Detector:
    model: torch.nn.Module  # eval mode, on CPU
    postprocessor: torch.nn.Module
    categories: Dict[int, str]  # class id -> name (ids without a name are drawn as numbers)
    transform: Dict[str, Any]  # data.transform mapping of the training job
    source: str  # what was loaded, for the JSON

    @torch.no_grad()
    def detect(self, data: bytes, max_detections: int = 100) -> Tuple[Any, List[Dict[str, Any]]]:
        """(the decoded RGB picture, detections by descending score) of one encoded image.

        Each detection: ``{"label": id, "name": str, "score": float, "box": [x0, y0, x1, y1]}`` in
        original-image pixels, clipped to the picture.
        """
        picture, image = decode_for_eval(data, self.transform)
        width, height = picture.size
        image = torch.from_numpy(image)
        mask = torch.zeros((1, image.shape[2], image.shape[3]), dtype=torch.bool)
        outputs = self.model(image, mask)
        (result,) = self.postprocessor(outputs, torch.tensor([[height, width]]))
        return picture, format_detections(result["scores"].numpy(), result["labels"].numpy(),
                                          result["boxes"].numpy(), width, height, self.categories, max_detections)


def decode_for_eval(data: bytes, transform: Mapping[str, Any]) -> Tuple[Any, "np.ndarray"]:
    """(the decoded RGB picture, the network input ``[1, 3, H, W]`` float32, normalised) of one
    encoded image under the evaluation transform of ``transform`` (a ``data.transform`` mapping)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from dino_platform.data.transforms import eval_plan, normalize, render, transform_configs

    try:
        picture = Image.open(io.BytesIO(data))
        picture.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot decode the image ({exc})") from None
    picture = picture.convert("RGB")
    width, height = picture.size
    _, eval_cfg = transform_configs(transform)
    plan = eval_plan(width, height, eval_cfg)
    try:
        rendered = render(data, width, height, plan)
    except Exception as exc:  # named with the plan, so it reproduces with one call
        raise DataError(f"cannot transform the {width}x{height} image with {plan} "
                        f"({type(exc).__name__}: {exc})") from exc
    image = np.ascontiguousarray(normalize(rendered, eval_cfg.mean, eval_cfg.std)[None], dtype=np.float32)
    return picture, image


def rank_and_clip(scores, labels, boxes, width: int, height: int) -> Tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """(scores, labels, boxes) by descending score (stable among ties), boxes clipped to the picture.

    ``scores [N]``, ``labels [N]``, ``boxes [N, 4]`` (x0, y0, x1, y1) in original-image pixels, as
    numpy arrays (dtypes kept). The network may place a box partly outside the picture; what
    ``dino predict`` and ``dino infer`` report is the visible part.
    """
    import numpy as np

    scores = np.asarray(scores)
    order = np.argsort(-scores, kind="stable")
    boxes = np.asarray(boxes)[order]  # fancy indexing copies: the caller's array stays as it was
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return scores[order], np.asarray(labels)[order], boxes


def format_detections(scores, labels, boxes, width: int, height: int, categories: Mapping[int, str],
                      max_detections: int) -> List[Dict[str, Any]]:
    """The best ``max_detections`` of ``rank_and_clip``, as ``{"label", "name", "score", "box"}``."""
    scores, labels, boxes = rank_and_clip(scores, labels, boxes, width, height)
    detections = []
    for score, label, box in zip(scores[:max_detections].tolist(), labels[:max_detections].tolist(),
                                 boxes[:max_detections].tolist()):
        detections.append({"label": int(label), "name": categories.get(int(label), str(int(label))),
                           "score": round(float(score), 5), "box": [round(float(v), 2) for v in box]})
    return detections


def load_detector(model_ref: str, tracking_uri: Optional[str] = None, preset: Optional[str] = None,
                  num_classes: Optional[int] = None) -> Detector:
    """A registered model (``models:/name@alias``, ``models:/name/3``) or checkpoint URI, ready to run.

    Checkpoints: a platform checkpoint directory or ``model.pt`` (its ``train_config.json`` names the
    model), or an official DINO ``.pth`` (then ``preset`` and ``num_classes`` are required).
    """
    import dino_core

    if model_ref.startswith("models:/"):
        import os

        from dino_platform.registry.models import CONFIG_FILE, WEIGHTS_FILE, download_model

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ConfigError(f"{model_ref}: which registry? set MLFLOW_TRACKING_URI or pass --tracking-uri")
        directory = download_model(model_ref, uri)
        config = json.loads((directory / CONFIG_FILE).read_text())
        model_section = {"preset": preset or config["preset"], "num_classes": num_classes or config["num_classes"],
                         "overrides": config.get("overrides", {})}
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        categories = {int(k): v for k, v in config.get("categories", {}).items()}
        transform = config.get("transform", {})
    else:
        from dino_platform.train.checkpoint import read_model_state, read_train_config

        recorded = read_train_config(model_ref) or {}
        model_section = dict(recorded.get("model") or {})
        if preset:
            model_section["preset"] = preset
        if num_classes:
            model_section["num_classes"] = num_classes
        if "preset" not in model_section or "num_classes" not in model_section:
            raise ConfigError(f"{model_ref}: no train_config.json beside the weights; name the model with "
                              "--preset and --num-classes (e.g. dino_r50_4scale, 91)")
        state = read_model_state(model_ref)
        transform = (recorded.get("data") or {}).get("transform") or {}
        categories = _checkpoint_categories(recorded, int(model_section["num_classes"]))
    model, _, postprocessor = dino_core.build_model(model_section["preset"], num_classes=int(model_section["num_classes"]),
                                                    **dict(model_section.get("overrides") or {}))
    dino_core.load_official_state_dict(model, state, strict=True)
    model.eval()
    return Detector(model=model, postprocessor=postprocessor, categories=categories, transform=transform,
                    source=model_ref)


def _checkpoint_categories(recorded: Mapping[str, Any], num_classes: int) -> Dict[int, str]:
    """Names from the training data's manifest; else the COCO / Objects365 names when the head fits them."""
    from dino_platform.data.categories import coco_categories, objects365_categories
    from dino_platform.data.manifest import read_manifest

    data = recorded.get("data") or {}
    for uri in (data.get("eval_uri"), data.get("train_uri")):
        if uri:
            try:
                return dict(read_manifest(uri).categories)
            except Exception as exc:  # moved or unreachable data: fall back to the known label spaces
                log.debug("no category names from %s: %s", uri, exc)
    if num_classes == 91:
        return coco_categories()
    if num_classes == 366:
        return objects365_categories()
    return {}


def predict_to_directory(detector: Detector, images: Sequence[Tuple[str, bytes]], out_dir: str,
                         threshold: float = 0.3, max_detections: int = 100,
                         max_drawn: Optional[int] = None, on_error: str = "fail") -> Dict[str, Any]:
    """Write ``<stem>.png`` (boxes with score >= ``threshold`` drawn, the best ``max_drawn`` at most)
    per image and ``detections.json``.

    Returns the JSON document: ``{"model": ..., "threshold": ..., "images": [{"file", "png",
    "width", "height", "png_scale", "detections": [...]}]}``; ``png_scale`` is the whole factor a
    small picture was enlarged by for drawing (1 from a 480 px short side up); boxes are always in
    the original image's pixels. Every detection up to ``max_detections`` is listed
    with its score (threshold and max_drawn only decide what is drawn, flagged ``"drawn": true``).
    ``on_error``: ``fail`` raises a ``DataError`` naming the image that cannot be decoded or
    transformed; ``skip`` leaves it out and lists it under ``"skipped"`` (``{"file", "error"}``).
    """
    if on_error not in ("fail", "skip"):
        raise ConfigError(f"on_error: one of fail, skip; got {on_error!r}")
    from dino_platform.storage import resolve
    from dino_platform.drawing import draw_detections

    out = resolve(out_dir)
    out.ensure_dir()
    document: Dict[str, Any] = {"model": detector.source, "threshold": threshold, "images": [], "skipped": []}
    used_names: set = set()
    for name, data in images:
        try:
            picture, detections = detector.detect(data, max_detections=max_detections)
        except DataError as exc:
            if on_error != "skip":
                raise DataError(f"{name}: {exc} (--on-error skip leaves such images out)") from exc
            log.warning("skipped %s: %s", name, exc)
            document["skipped"].append({"file": name, "error": str(exc)})
            continue
        drawn = [d for d in detections if d["score"] >= threshold][:max_drawn]
        for index, d in enumerate(detections):
            d["drawn"] = d["score"] >= threshold and (max_drawn is None or index < max_drawn)
        canvas = draw_detections(picture, [d["box"] for d in drawn], [d["label"] for d in drawn],
                                 [d["score"] for d in drawn], detector.categories)
        png_name = _unique(Path(name).stem or "image", used_names) + ".png"
        buffer = io.BytesIO()
        canvas.save(buffer, format="PNG")
        out.child(png_name).write_bytes(buffer.getvalue())
        document["images"].append({"file": name, "png": out.child(png_name).uri, "width": picture.size[0],
                                   "height": picture.size[1], "png_scale": canvas.size[0] // picture.size[0],
                                   "detections": detections})
        log.info("%s: %d detections >= %.2f (top score %.3f) -> %s", name, len(drawn), threshold,
                 detections[0]["score"] if detections else 0.0, out.child(png_name).uri)
    out.child("detections.json").write_bytes(json.dumps(document, indent=1).encode())
    document["json"] = out.child("detections.json").uri
    return document


def _unique(stem: str, used: set) -> str:
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}_{n}"
    used.add(candidate)
    return candidate
