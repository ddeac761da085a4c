"""COCO box AP from per-image ground truth and detections gathered off the workers.

Ground truth is rebuilt from the evaluation shards themselves (the same rows the workers predicted
on), so the score covers exactly the images evaluated. Labels are the dataset's own category ids
(models are built with ``num_classes = max id + 1``), so results need no id remapping; detections
whose label is not one of the dataset's categories are ignored, as pycocotools ignores unknown ids.

How detections are scored is an ``EvalConfig`` (official DINO by default, see its docstring), recorded with
each result as its ``EvalProtocol``. The two engines, ``faster_coco_eval`` (C++, the default) and ``pycocotools``
(the reference), compute the same numbers: tests/platform/evaluation/test_eval_engines.py holds them to 1e-9.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Union, get_args

import numpy as np

from dino_platform.errors import ConfigError

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
Engine = Literal["faster_coco_eval", "pycocotools"]
ENGINES = get_args(Engine)


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


@dataclass(frozen=True)
class EvalConfig:
    """How a COCO evaluation runs, and the one place its defaults live: ``dino train``'s and a pipeline
    evaluate stage's ``eval`` section, ``dino eval``'s flags. Errors name the field.

    batch_size: images loaded per batch on each worker (speed only; the scores do not depend on it).
    detections_per_image: None = the official DINO protocol (every post-processed detection is
        scored); 100 = the COCO-challenge rule (the best 100 per image across classes).
    max_dets: COCOeval's ``maxDets[-1]``: the per-image, per-category cap (AP and AR100 use it).
    engine: ``faster_coco_eval`` or ``pycocotools``; identical numbers.
    """

    batch_size: int = 2
    detections_per_image: Optional[int] = None
    max_dets: int = 100
    engine: Engine = "faster_coco_eval"

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: {self.batch_size} must be >= 1")
        if self.detections_per_image is not None and self.detections_per_image < 1:
            raise ConfigError(f"detections_per_image: {self.detections_per_image} must be >= 1 (or null: all)")
        if self.max_dets < 1:
            raise ConfigError(f"max_dets: {self.max_dets} must be >= 1")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine: {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.engine == "pycocotools" and self.max_dets != 100:
            raise ConfigError(f"max_dets: {self.max_dets} with engine pycocotools, whose summary AP is defined "
                              "only at maxDets=100; use engine faster_coco_eval or max_dets 100")

    def protocol(self, num_select: Optional[int] = None) -> "EvalProtocol":
        return EvalProtocol(num_select, self.detections_per_image, self.max_dets, self.engine)


@dataclass(frozen=True)
class EvalProtocol:
    """How detections were scored, recorded with every result so that only like is compared with like:
    an ``EvalConfig``'s protocol (its defaults, its checks) and the model's ``num_select`` (recorded,
    not applied). The engine gives identical numbers, so it is not part of ``key``."""

    num_select: Optional[int] = None
    detections_per_image: Optional[int] = EvalConfig.detections_per_image
    max_dets: int = EvalConfig.max_dets
    engine: str = EvalConfig.engine

    def __post_init__(self):
        EvalConfig(detections_per_image=self.detections_per_image, max_dets=self.max_dets, engine=self.engine)

    @property
    def name(self) -> str:
        return "official" if self.detections_per_image is None else f"top{self.detections_per_image}-per-image"

    @property
    def key(self) -> str:
        """What makes two AP figures comparable, e.g. ``official/num_select=300/maxDets=100``."""
        return f"{self.name}/num_select={self.num_select}/maxDets={self.max_dets}"

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "key": self.key, **asdict(self)}


PROTOCOL_TAG = "eval.protocol"


def protocol_tags(protocol: Mapping[str, Any]) -> Dict[str, str]:
    """MLflow tags of a recorded protocol (``CocoResult.protocol``): ``eval.protocol`` (its key) and
    ``eval.num_select``, ``eval.detections_per_image``, ``eval.max_dets``, ``eval.engine``."""
    fields = ("num_select", "detections_per_image", "max_dets", "engine")
    return {PROTOCOL_TAG: str(protocol["key"]), **{f"eval.{k}": str(protocol.get(k)) for k in fields}}


@dataclass
class Detections:
    """Detections of many images, columnar: what workers gather to rank 0 (a few arrays, no dict per box).

    image_ids: [I] ids; counts: [I] detections per image; boxes: [N, 4] (x0, y0, x1, y1) original
    pixels, float32; scores: [N] float32; labels: [N] int64; rows of image i are
    ``offsets[i]:offsets[i + 1]`` with ``offsets = [0, *cumsum(counts)]``.
    """

    image_ids: List[Any]
    counts: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    @staticmethod
    def empty() -> "Detections":
        return Detections([], np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                          np.zeros(0, np.int64))

    @staticmethod
    def from_predictions(predictions: Sequence[ImagePrediction]) -> "Detections":
        if not predictions:
            return Detections.empty()
        return Detections(
            image_ids=[p.image_id for p in predictions],
            counts=np.asarray([len(np.asarray(p.scores).reshape(-1)) for p in predictions], dtype=np.int64),
            boxes=np.concatenate([np.asarray(p.boxes, np.float32).reshape(-1, 4) for p in predictions]),
            scores=np.concatenate([np.asarray(p.scores, np.float32).reshape(-1) for p in predictions]),
            labels=np.concatenate([np.asarray(p.labels, np.int64).reshape(-1) for p in predictions]),
        )

    @staticmethod
    def concat(parts: Sequence["Detections"]) -> "Detections":
        parts = [p for p in parts if len(p.image_ids)]
        if not parts:
            return Detections.empty()
        return Detections([i for p in parts for i in p.image_ids], np.concatenate([p.counts for p in parts]),
                          np.concatenate([p.boxes for p in parts]), np.concatenate([p.scores for p in parts]),
                          np.concatenate([p.labels for p in parts]))


@dataclass
class CocoResult:
    stats: Dict[str, float]
    per_class_ap: Dict[int, float]
    category_names: Dict[int, str]
    num_images: int
    num_detections: int
    detections: List[Dict[str, Any]] = field(default_factory=list, repr=False)
    protocol: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        """The COCO eval JSON logged as an artifact: protocol, summary, per-class AP, and the detections."""
        return {
            "protocol": self.protocol,
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
            image_id=img["id"], height=int(img["height"]), width=int(img["width"]),
            boxes=np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
            labels=np.asarray([a["category_id"] for a in anns], dtype=np.int64),
            iscrowd=np.asarray([a.get("iscrowd", 0) for a in anns], dtype=np.int64),
            area=np.asarray([a.get("area", w * h) for a, (w, h) in zip(anns, xywh[:, 2:])], dtype=np.float64),
        ))
    return truths


def evaluate_coco(
    truths: Sequence[ImageTruth],
    predictions: Union[Sequence[ImagePrediction], Detections],
    categories: Mapping[int, str],
    protocol: Optional[EvalProtocol] = None,
) -> CocoResult:
    """COCO bbox evaluation of ``predictions`` under ``protocol`` (default: the official DINO one).

    The inputs may arrive in any order and split any way across workers: images and detections are
    sorted into a canonical order first (image, score desc, label, box), so neither the AP nor the
    choice among tied scores depends on how inference was sharded. Each image must appear exactly
    once in ``truths``; predictions for unknown images are an error.
    """
    protocol = protocol or EvalProtocol()
    truths = sorted(truths, key=lambda t: _sort_key(t.image_id))
    index_of: Dict[Any, int] = {}
    for t in truths:
        if t.image_id in index_of:
            raise ValueError(f"image_id {t.image_id!r} appears twice in the evaluation ground truth")
        index_of[t.image_id] = len(index_of) + 1  # the engines want positive integer ids
    cat_ids = sorted(int(c) for c in categories)

    images, annotations = [], []
    for t in truths:
        iid = index_of[t.image_id]
        images.append({"id": iid, "height": int(t.height), "width": int(t.width)})
        boxes = np.asarray(t.boxes, dtype=np.float64).reshape(-1, 4)
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        areas = t.area if t.area is not None else xywh[:, 2] * xywh[:, 3]
        crowd = t.iscrowd if t.iscrowd is not None else np.zeros(len(boxes), np.int64)
        for box, label, area, iscrowd in zip(xywh.tolist(), t.labels, areas, crowd):
            annotations.append({"id": len(annotations) + 1, "image_id": iid, "category_id": int(label), "bbox": box,
                                "area": float(area), "iscrowd": int(iscrowd)})
    cat_list = [{"id": c, "name": str(categories[c])} for c in cat_ids]

    dets = predictions if isinstance(predictions, Detections) else Detections.from_predictions(predictions)
    for image_id in dets.image_ids:
        if image_id not in index_of:
            raise ValueError(f"prediction for image_id {image_id!r}, which has no ground truth")
    image_index = np.repeat(np.asarray([index_of[i] for i in dets.image_ids], dtype=np.int64), dets.counts)
    boxes = np.asarray(dets.boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(dets.scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(dets.labels, dtype=np.int64).reshape(-1)
    order = np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], labels, -scores, image_index))
    if protocol.detections_per_image is not None:  # COCO-challenge rule: best N per image across classes
        grouped = image_index[order]
        rank = np.arange(len(order)) - np.searchsorted(grouped, grouped, side="left")
        order = order[rank < protocol.detections_per_image]
    original_ids = np.repeat(np.arange(len(dets.image_ids)), dets.counts)[order].tolist()
    b = boxes[order]
    xywh = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
    detections = [
        {"image_id": dets.image_ids[k], "category_id": c, "bbox": box, "score": s}
        for k, c, box, s in zip(original_ids, labels[order].tolist(), xywh.tolist(), scores[order].tolist())
    ]
    areas = (xywh[:, 2] * xywh[:, 3]).tolist()
    results = [{**d, "id": n, "image_id": engine_id, "area": area, "iscrowd": 0}
               for n, (d, engine_id, area) in enumerate(zip(detections, image_index[order].tolist(), areas), 1)]
    stats, precision = _run_engine(protocol, images, annotations, cat_list, results, cat_ids)
    per_class = {}
    for k, cid in enumerate(cat_ids):
        values = precision[:, :, k, 0, -1]  # all areas, the largest maxDets; -1 = no ground truth
        values = values[values > -1]
        per_class[cid] = float(values.mean()) if values.size else float("nan")
    return CocoResult(
        stats={name: float(v) for name, v in zip(STAT_NAMES, stats)},
        per_class_ap=per_class,
        category_names={c: str(categories[c]) for c in cat_ids},
        num_images=len(images), num_detections=len(detections), detections=detections,
        protocol=protocol.to_dict(),
    )


def _run_engine(protocol: EvalProtocol, images: List[dict], annotations: List[dict], cat_list: List[dict],
                results: List[dict], cat_ids: List[int]):
    """(12 summary stats, precision [T, R, K, A, M]) from the chosen engine, its prints silenced."""
    if protocol.engine == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval

    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": cat_list}
    dt = COCO()
    dt.dataset = {"images": images, "categories": cat_list, "annotations": results}
    with _quiet():
        gt.createIndex()
        dt.createIndex()
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.params.imgIds = [img["id"] for img in images]
        evaluator.params.catIds = cat_ids
        evaluator.params.maxDets = [1, 10, protocol.max_dets]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return list(evaluator.stats)[: len(STAT_NAMES)], np.asarray(evaluator.eval["precision"])


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
