"""Deployable exports of a model (ONNX) and running them with onnxruntime alone.

    export_model("models:/dino-coco@champion", "dino.onnx", tracking_uri=...)   # anything load_artifact takes
    detector = load_onnx_detector("dino.onnx")        # a model.detector.Detector
    predict_to_directory(detector, images, "predictions/")

The ``.onnx`` file is self-contained: besides the graph (see :mod:`dino_core.export`) its metadata
(``dino_platform`` key, JSON) records the model, the evaluation transform and the category names,
so ``dino predict --onnx`` draws the same PNGs and JSON as ``dino predict --model`` without torch
weights or a registry.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from dino_platform.errors import ConfigError
from dino_platform.model.artifact import load_artifact
from dino_platform.model.detector import Detector, rank_and_clip
from dino_platform.storage import resolve

log = logging.getLogger("dino.export")

FORMATS = ("onnx",)
METADATA_KEY = "dino_platform"
ONNX_FILE = "model.onnx"


def export_model(model_ref: str, out: str, fmt: str = "onnx", opset: int = 17, with_postprocess: bool = True,
                 height: int = 512, width: int = 512, tracking_uri: Optional[str] = None,
                 preset: Optional[str] = None, num_classes: Optional[int] = None) -> Dict[str, Any]:
    """Export a registered model or checkpoint (anything ``dino predict --model`` takes) to ``out``.

    Returns the metadata written into the file (model, transform, categories, inputs/outputs).
    """
    import onnx

    from dino_core.export import ExportError, export_onnx

    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
    artifact = load_artifact(model_ref, tracking_uri=tracking_uri, preset=preset, num_classes=num_classes)
    model, _ = artifact.build()
    try:
        export_onnx(model, out, height=height, width=width, opset=opset, with_postprocess=with_postprocess)
    except ExportError as exc:
        raise ConfigError(f"{model_ref}: {exc}") from None
    cfg = model.config
    metadata = {
        "format_version": 1, "source": model_ref, "model_config": dataclasses.asdict(cfg),
        "num_classes": model.num_classes, "num_queries": model.num_queries, "num_select": cfg.num_select,
        "with_postprocess": with_postprocess, "opset": opset, "export_size": [height, width],
        "categories": {str(k): v for k, v in sorted(artifact.categories.items())},
        "transform": artifact.transform,
        "inputs": ["images", "mask"] + (["target_sizes"] if with_postprocess else []),
        "outputs": ["pred_logits", "pred_boxes"] + (["scores", "labels", "boxes"] if with_postprocess else []),
    }
    graph = onnx.load(out)
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.save(graph, out)
    log.info("exported %s to %s (opset %d, %s post-processing)", model_ref, out, opset,
             "with" if with_postprocess else "without")
    return metadata


def read_metadata(path: str) -> Dict[str, Any]:
    """The dino_platform metadata of an exported ``.onnx`` file (ConfigError if it has none)."""
    import onnx

    try:
        graph = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise ConfigError(f"--onnx: cannot read {path} as an ONNX model ({exc})") from None
    for entry in graph.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    raise ConfigError(f"--onnx: {path} was not written by `dino export` (no {METADATA_KEY} metadata); "
                      "export it with `dino export --model ... --format onnx`")


@dataclass
class OnnxDetector(Detector):
    """An exported graph run by onnxruntime."""

    session: Any  # onnxruntime.InferenceSession
    metadata: Dict[str, Any]

    def predict(self, image, height: int, width: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        feeds = {"images": image, "mask": np.zeros((1, image.shape[2], image.shape[3]), dtype=bool)}
        if self.metadata.get("with_postprocess"):
            feeds["target_sizes"] = np.array([[height, width]], dtype=np.int64)
            _, _, scores, labels, boxes = self.session.run(None, feeds)
            return rank_and_clip(scores[0], labels[0], boxes[0], width, height)
        import dino_core  # the graph was exported without post-processing: dino_core's, on its outputs
        import torch

        logits, pred_boxes = self.session.run(None, feeds)
        outputs = {"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(pred_boxes)}
        (result,) = dino_core.PostProcess(int(self.metadata["num_select"]))(outputs, [[height, width]])
        return rank_and_clip(result["scores"].numpy(), result["labels"].numpy(), result["boxes"].numpy(), width, height)


def load_onnx_detector(path: str) -> OnnxDetector:
    """An :class:`OnnxDetector` for a file written by :func:`export_model` (local path or URI)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("--onnx needs onnxruntime: pip install 'dino-platform[export]'") from None
    local = Path(path)
    if not local.is_file():  # a remote URI: run from a local copy
        import tempfile

        local = Path(tempfile.mkdtemp(prefix="dino-onnx-")) / ONNX_FILE
        local.write_bytes(resolve(path).read_bytes())
    metadata = read_metadata(str(local))
    session = ort.InferenceSession(str(local), providers=["CPUExecutionProvider"])
    categories = {int(k): v for k, v in metadata.get("categories", {}).items()}
    return OnnxDetector(categories=categories, transform=dict(metadata.get("transform") or {}),
                        source=metadata.get("source", path), session=session, metadata=metadata)
