"""The detector interface: an encoded image in, ranked detections in original pixels out.

Each image is resized as the model's evaluation transform does, run alone (no padding, as in
evaluation) and its boxes mapped back to the original pixels. A runtime implements ``predict``:
``TorchDetector`` here, ``serving.onnx.OnnxDetector`` for an exported graph.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import torch

from dino_platform.errors import DataError


@dataclass
class Detector:
    categories: Dict[int, str]  # class id -> name (ids without a name are drawn as numbers)
    transform: Dict[str, Any]  # data.transform mapping the model was trained with
    source: str  # what was loaded, for the JSON

    def predict(self, image, height: int, width: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``rank_and_clip``'s (scores [N], labels [N], boxes [N, 4] x0 y0 x1 y1 pixels) of one
        normalised network input ``image`` [1, 3, H, W] of an original ``height`` x ``width`` picture."""
        raise NotImplementedError

    def detect(self, data: bytes, max_detections: int = 100) -> Tuple[Any, List[Dict[str, Any]]]:
        """(the decoded RGB picture, detections by descending score) of one encoded image.

        Each detection: ``{"label": id, "name": str, "score": float, "box": [x0, y0, x1, y1]}`` in
        original-image pixels, clipped to the picture.
        """
        picture, image = decode_for_eval(data, self.transform)
        width, height = picture.size
        scores, labels, boxes = (np.asarray(a)[:max_detections].tolist() for a in self.predict(image, height, width))
        return picture, [{"label": int(label), "name": self.categories.get(int(label), str(int(label))),
                          "score": round(float(score), 5), "box": [round(float(v), 2) for v in box]}
                         for score, label, box in zip(scores, labels, boxes)]


@dataclass
class TorchDetector(Detector):
    model: torch.nn.Module  # eval mode; inputs go to the device its parameters are on
    postprocessor: torch.nn.Module

    def predict(self, image, height: int, width: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        result = run_alone(self.model, self.postprocessor, image, (height, width))
        return rank_and_clip(result["scores"].float().cpu().numpy(), result["labels"].cpu().numpy().astype(np.int64),
                             result["boxes"].float().cpu().numpy(), width, height)


@torch.no_grad()
def run_alone(model: torch.nn.Module, postprocessor: torch.nn.Module, image, orig_size) -> Dict[str, torch.Tensor]:
    """The postprocessor's ``scores [K]``, ``labels [K]``, ``boxes [K, 4]`` (x0, y0, x1, y1, original pixels,
    unranked) of one unpadded network input ``image [1, 3, h, w]`` of an original ``orig_size`` (h, w),
    run on the device of the model's parameters with an all-false mask."""
    device = next(model.parameters()).device
    image = torch.as_tensor(image).to(device)
    mask = torch.zeros((1, image.shape[2], image.shape[3]), dtype=torch.bool, device=device)
    (result,) = postprocessor(model(image, mask), torch.as_tensor(orig_size).reshape(1, 2).to(device))
    return result


def decode_for_eval(data: bytes, transform: Mapping[str, Any]) -> Tuple[Any, np.ndarray]:
    """(the decoded RGB picture, the network input ``[1, 3, H, W]`` float32, normalised) of one
    encoded image under the evaluation transform of ``transform`` (a ``data.transform`` mapping)."""
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


def rank_and_clip(scores, labels, boxes, width: int, height: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, labels, boxes) by descending score (stable among ties), boxes clipped to the picture.

    ``scores [N]``, ``labels [N]``, ``boxes [N, 4]`` (x0, y0, x1, y1) in original-image pixels, as
    numpy arrays (dtypes kept). The network may place a box partly outside the picture; what
    ``dino predict`` and ``dino infer`` report is the visible part.
    """
    scores = np.asarray(scores)
    order = np.argsort(-scores, kind="stable")
    boxes = np.asarray(boxes)[order]  # fancy indexing copies: the caller's array stays as it was
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return scores[order], np.asarray(labels)[order], boxes
