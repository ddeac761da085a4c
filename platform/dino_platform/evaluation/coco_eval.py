"""COCO box AP with pycocotools, from per-image ground truth and predictions gathered off the workers.

Ground truth is rebuilt from the evaluation shards themselves (the same rows the workers predicted
on), so the score covers exactly the images evaluated. Labels are the dataset's own category ids
(models are built with ``num_classes = max id + 1``), so results need no id remapping; detections
whose label is not one of the dataset's categories are ignored, as pycocotools ignores unknown ids.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass
class ImageTruth:
    """One image's annotations in original-image pixels.

    boxes: [N, 4] (x0, y0, x1, y1); labels: [N] category ids; iscrowd/area: [N] or None
    (None: not crowd, area = box area).
    """

    image_id: Any
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: Optional[np.ndarray] = None
    area: Optional[np.ndarray] = None


@dataclass
class ImagePrediction:
    """One image's detections: boxes [K, 4] (x0, y0, x1, y1) in original pixels, scores [K], labels [K]."""

    image_id: Any
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


@dataclass
class CocoResult:
    stats: Dict[str, float]
    per_class_ap: Dict[int, float]
    category_names: Dict[int, str]
    num_images: int
    num_detections: int
    detections: List[Dict[str, Any]] = field(default_factory=list, repr=False)

    def to_json(self) -> Dict[str, Any]:
        """The COCO eval JSON logged as an artifact: summary, per-class AP, and the detections."""
        return {
            "stats": self.stats,
            "per_class": [
                # AP is null for classes without ground truth (pycocotools' -1; strict JSON has no NaN)
                {"category_id": cid, "name": self.category_names.get(cid, str(cid)), "AP": ap if ap == ap else None}
                for cid, ap in sorted(self.per_class_ap.items())
            ],
            "num_images": self.num_images,
            "num_detections": self.num_detections,
            "detections": self.detections,
        }


def truths_from_coco(ground_truth: Mapping[str, Any]) -> List[ImageTruth]:
    """ImageTruths from a COCO-format dict (``images``, ``annotations`` with ``bbox`` [x, y, w, h])."""
    per_image: Dict[Any, List[dict]] = {img["id"]: [] for img in ground_truth["images"]}
    for ann in ground_truth["annotations"]:
        per_image[ann["image_id"]].append(ann)
    truths = []
    for img in ground_truth["images"]:
        anns = per_image[img["id"]]
        xywh = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        truths.append(ImageTruth(
            image_id=img["id"],
            height=int(img["height"]),
            width=int(img["width"]),
            boxes=np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
            labels=np.asarray([a["category_id"] for a in anns], dtype=np.int64),
            iscrowd=np.asarray([a.get("iscrowd", 0) for a in anns], dtype=np.int64),
            area=np.asarray([a.get("area", w * h) for a, (w, h) in zip(anns, xywh[:, 2:])], dtype=np.float64),
        ))
    return truths


def evaluate_coco(
    truths: Sequence[ImageTruth],
    predictions: Sequence[ImagePrediction],
    categories: Mapping[int, str],
    max_detections: int = 100,
) -> CocoResult:
    """Run pycocotools' bbox evaluation.

    The inputs may arrive in any order and split any way across workers: images and detections are
    sorted into a canonical order first, so the AP does not depend on how inference was sharded.
    Each image must appear exactly once in ``truths``; predictions for unknown images are an error.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truths = sorted(truths, key=lambda t: _sort_key(t.image_id))
    index_of = {}
    for t in truths:
        if t.image_id in index_of:
            raise ValueError(f"image_id {t.image_id!r} appears twice in the evaluation ground truth")
        index_of[t.image_id] = len(index_of) + 1  # pycocotools wants positive integer ids
    cat_ids = sorted(int(c) for c in categories)

    images, annotations = [], []
    for t in truths:
        iid = index_of[t.image_id]
        images.append({"id": iid, "height": int(t.height), "width": int(t.width)})
        boxes = np.asarray(t.boxes, dtype=np.float64).reshape(-1, 4)
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        for j in range(len(boxes)):
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": iid,
                "category_id": int(t.labels[j]),
                "bbox": [float(boxes[j, 0]), float(boxes[j, 1]), float(widths[j]), float(heights[j])],
                "area": float(t.area[j]) if t.area is not None else float(widths[j] * heights[j]),
                "iscrowd": int(t.iscrowd[j]) if t.iscrowd is not None else 0,
            })
    cat_list = [{"id": c, "name": str(categories[c])} for c in cat_ids]

    detections = []
    for p in sorted(predictions, key=lambda p: _sort_key(p.image_id)):
        if p.image_id not in index_of:
            raise ValueError(f"prediction for image_id {p.image_id!r}, which has no ground truth")
        boxes = np.asarray(p.boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(p.scores, dtype=np.float64).reshape(-1)
        labels = np.asarray(p.labels).reshape(-1)
        # canonical order (score desc, then label, then box) so ties never depend on arrival order
        order = np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], labels, -scores))[:max_detections]
        for j in order:
            x0, y0, x1, y1 = boxes[j]
            detections.append({
                "image_id": p.image_id,
                "category_id": int(labels[j]),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "score": float(scores[j]),
            })

    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": cat_list}
    dt = COCO()
    dt.dataset = {
        "images": images,
        "categories": cat_list,
        "annotations": [
            {**d, "id": i + 1, "image_id": index_of[d["image_id"]], "area": d["bbox"][2] * d["bbox"][3], "iscrowd": 0}
            for i, d in enumerate(detections)
        ],
    }
    with _quiet():
        gt.createIndex()
        dt.createIndex()
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.params.imgIds = [img["id"] for img in images]
        evaluator.params.catIds = cat_ids
        evaluator.params.maxDets = [1, 10, max_detections]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    stats = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
    # precision: [iou thresholds, recall points, categories, area ranges, max dets]; -1 = no ground truth
    precision = evaluator.eval["precision"]
    per_class = {}
    for k, cid in enumerate(cat_ids):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        per_class[cid] = float(values.mean()) if values.size else float("nan")
    return CocoResult(
        stats=stats,
        per_class_ap=per_class,
        category_names={c: str(categories[c]) for c in cat_ids},
        num_images=len(images),
        num_detections=len(detections),
        detections=detections,
    )


@contextlib.contextmanager
def _quiet():
    """Silence pycocotools' progress prints.

    Ray Train V2 replaces ``builtins.print`` in its workers with a function that also sends the
    text to the logging system, past any ``redirect_stdout``; so ``print`` itself is swapped out.
    """
    import builtins

    original = builtins.print
    builtins.print = lambda *args, **kwargs: None
    try:
        yield
    finally:
        builtins.print = original


def _sort_key(image_id: Any) -> tuple:
    # ids are ints for COCO but may be strings for other sources; never compare int with str
    return (0, image_id, "") if isinstance(image_id, (int, np.integer)) else (1, 0, str(image_id))
