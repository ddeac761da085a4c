"""Detections on individual images, drawn and as JSON (``dino predict``, the pipeline's predict stage)::

    detector = load_artifact("models:/dino-coco@champion").detector()   # or serving.onnx.load_onnx_detector
    written = predict_to_directory(detector, [("street.jpg", jpeg_bytes)], "predictions/", threshold=0.3)
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from dino_platform.errors import ConfigError, DataError
from dino_platform.model.detector import Detector

log = logging.getLogger("dino.predict")


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
