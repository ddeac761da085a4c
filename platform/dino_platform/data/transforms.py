"""DINO's image transforms, with the box arithmetic of the official code and one resample per image.

Training (the official recipe, scales configurable)::

    random horizontal flip (p=0.5)
    then, with p=0.5 each:
      A. resize the short side to a random one of ``scales`` (long side <= ``max_size``)
      B. resize the short side to one of ``crop_resize_scales`` -> random crop of
         ``crop_min..crop_max`` pixels per side -> A
    normalise with the ImageNet mean/std

Evaluation: resize the short side to ``short_side`` (long side <= ``max_size``), normalise.
Targets: the official COCO preparation (``coco_boxes_to_corners``), then the plan's geometry.

NOTE: the official code resamples the picture once per resize (twice in branch B, plus the crop).
Here the flip/resize/crop chain is composed into one source rectangle and one output size, and the
picture is resampled once from it (JPEGs are decoded at a reduced DCT scale when that still gives
enough pixels). Boxes follow the official arithmetic exactly; pixels differ only by interpolation.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
from PIL import Image

from dino_platform.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TrainTransformConfig:
    """Training augmentation; the defaults are the official DINO/DETR values."""

    scales: Tuple[int, ...] = tuple(range(480, 801, 32))
    max_size: int = 1333
    crop_resize_scales: Tuple[int, ...] = (400, 500, 600)
    crop_min: int = 384
    crop_max: int = 600
    flip_prob: float = 0.5
    crop_branch_prob: float = 0.5
    # the normalisation the model expects: applied by ``streaming.collate`` (pass these to it)
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("scales", "crop_resize_scales"):
            value = getattr(self, name)
            if not value or not all(isinstance(s, int) and s > 0 for s in value):
                raise ConfigError(f"transform.{name}: a non-empty list of positive integers, got {value!r}")
        if not 0 < self.crop_min <= self.crop_max:
            raise ConfigError(f"transform.crop_min/crop_max: need 0 < crop_min <= crop_max, "
                              f"got {self.crop_min}, {self.crop_max}")
        if self.max_size < 1:
            raise ConfigError(f"transform.max_size: must be positive, got {self.max_size}")
        for name in ("flip_prob", "crop_branch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"transform.{name}: a probability in [0, 1], got {getattr(self, name)}")
        _check_stats(self.mean, self.std)

    @classmethod
    def scaled(cls, factor: float) -> "TrainTransformConfig":
        """The official recipe with every size multiplied by ``factor`` (e.g. 0.4 for a CPU demo:
        scales 192..320, max 533); multi-scale sizes stay multiples of 32."""
        if not 0 < factor <= 4:
            raise ConfigError(f"transform.scale: a factor in (0, 4], got {factor}")
        low, high = math.ceil(480 * factor / 32) * 32, max(32, math.floor(800 * factor / 32) * 32)
        return cls(scales=tuple(range(min(low, high), high + 1, 32)), max_size=round(1333 * factor),
                   crop_resize_scales=tuple(round(s * factor) for s in (400, 500, 600)),
                   crop_min=round(384 * factor), crop_max=round(600 * factor))


@dataclass(frozen=True)
class EvalTransformConfig:
    short_side: int = 800
    max_size: int = 1333
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.short_side < 1 or self.max_size < 1:
            raise ConfigError(f"transform.eval_short_side/eval_max_size: must be positive, "
                              f"got {self.short_side}, {self.max_size}")
        _check_stats(self.mean, self.std)


def _check_stats(mean, std) -> None:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(f"transform.mean/std: three values each, std > 0; got {mean}, {std}")


TRANSFORM_KEYS = ("scale", *(f.name for f in fields(TrainTransformConfig)), "eval_short_side", "eval_max_size")


def transform_configs(mapping: Optional[Mapping[str, Any]]) -> Tuple[TrainTransformConfig, EvalTransformConfig]:
    """Training and evaluation configs from one plain mapping (e.g. a YAML ``transform:`` block).

    Keys: ``scale`` (a factor applied to the official sizes first, see ``TrainTransformConfig.scaled``),
    any field of TrainTransformConfig, and ``eval_short_side`` / ``eval_max_size`` (default: the
    largest training scale and ``max_size``, as in the official recipe).
    """
    mapping = dict(mapping or {})
    unknown = sorted(set(mapping) - set(TRANSFORM_KEYS))
    if unknown:
        raise ConfigError(f"transform.{unknown[0]}: unknown key; allowed: {', '.join(TRANSFORM_KEYS)}")
    base = TrainTransformConfig.scaled(float(mapping.pop("scale"))) if "scale" in mapping else TrainTransformConfig()
    eval_short = mapping.pop("eval_short_side", None)
    eval_max = mapping.pop("eval_max_size", None)
    train = replace(base, **{key: tuple(value) if isinstance(value, (list, tuple)) else value
                             for key, value in mapping.items()})
    evaluation = EvalTransformConfig(short_side=int(eval_short or max(train.scales)),
                                     max_size=int(eval_max or train.max_size), mean=train.mean, std=train.std)
    return train, evaluation


# --- geometry ------------------------------------------------------------------------------------
def resized_size(width: int, height: int, short_side: int, max_size: Optional[int]) -> Tuple[int, int]:
    """(width, height) after resizing the short side to ``short_side`` with the long side capped at
    ``max_size`` — the official rule, integer truncation included.

    NOTE: the official rule can return a zero side for extreme aspect ratios (a 1 x 4000 picture
    with ``max_size`` 266 gets a short side of ``round(0.07)`` = 0). Here both sides are at least 1
    pixel, and when the short side had to be raised to 1 the long side is capped at ``max_size``.
    """
    if width < 1 or height < 1:
        raise ValueError(f"resized_size: the picture is {width} x {height} pixels")
    raised = False
    if max_size is not None:
        short, long = float(min(width, height)), float(max(width, height))
        if long / short * short_side > max_size:
            short_side = int(round(max_size * short / long))
            if short_side < 1:
                short_side, raised = 1, True
    if (width <= height and width == short_side) or (height <= width and height == short_side):
        return width, height
    long_side = max(1, int(short_side * max(width, height) / min(width, height)))
    if raised:
        long_side = min(long_side, max_size)
    return (short_side, long_side) if width < height else (long_side, short_side)


@dataclass(frozen=True)
class GeometricPlan:
    """What one sample's transform does, in numbers.

    ``flip``: mirror first. ``crop_resize``: (w, h) of the pre-crop resize (branch B only);
    ``crop``: (left, top, width, height) in that resized picture. ``out_size``: final (w, h).
    """

    flip: bool
    crop_resize: Optional[Tuple[int, int]]
    crop: Optional[Tuple[int, int, int, int]]
    out_size: Tuple[int, int]


def sample_train_plan(width: int, height: int, cfg: TrainTransformConfig, rng: np.random.Generator) -> GeometricPlan:
    flip = bool(rng.random() < cfg.flip_prob)
    if rng.random() >= cfg.crop_branch_prob:
        short = int(cfg.scales[rng.integers(len(cfg.scales))])
        return GeometricPlan(flip, None, None, resized_size(width, height, short, cfg.max_size))
    crop_resize = resized_size(width, height, int(cfg.crop_resize_scales[rng.integers(len(cfg.crop_resize_scales))]), None)
    rw, rh = crop_resize
    # NOTE: the official code fails on pictures smaller than crop_min; here the crop shrinks to fit
    cw = int(rng.integers(min(cfg.crop_min, rw), min(rw, cfg.crop_max) + 1))
    ch = int(rng.integers(min(cfg.crop_min, rh), min(rh, cfg.crop_max) + 1))
    top = int(rng.integers(0, rh - ch + 1))
    left = int(rng.integers(0, rw - cw + 1))
    short = int(cfg.scales[rng.integers(len(cfg.scales))])
    return GeometricPlan(flip, crop_resize, (left, top, cw, ch), resized_size(cw, ch, short, cfg.max_size))


def eval_plan(width: int, height: int, cfg: EvalTransformConfig) -> GeometricPlan:
    return GeometricPlan(False, None, None, resized_size(width, height, cfg.short_side, cfg.max_size))


def _clip_corners(corners: np.ndarray, width: float, height: float) -> np.ndarray:
    """Clip ``[n, 4] (x0, y0, x1, y1)`` in place to the ``width x height`` picture; returns the non-empty [n] bool."""
    corners[:, [0, 2]] = corners[:, [0, 2]].clip(0, width)
    corners[:, [1, 3]] = corners[:, [1, 3]].clip(0, height)
    return (corners[:, 2] > corners[:, 0]) & (corners[:, 3] > corners[:, 1])


def transform_boxes(boxes: np.ndarray, width: int, height: int, plan: GeometricPlan) -> Tuple[np.ndarray, np.ndarray]:
    """Apply ``plan`` to ``boxes [n, 4] (x0, y0, x1, y1)`` in pixels of a ``width x height`` picture.

    Returns ``(boxes [m, 4] (x0, y0, x1, y1) in output pixels, keep [n] bool)``: boxes that a crop
    leaves empty are dropped, as in the official code.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    keep = np.ones(len(boxes), dtype=bool)
    if plan.flip:
        boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
    w, h = width, height
    if plan.crop is not None:
        rw, rh = plan.crop_resize
        boxes *= np.array([rw / w, rh / h, rw / w, rh / h])
        left, top, w, h = plan.crop
        boxes -= np.array([left, top, left, top], dtype=np.float64)
        keep = _clip_corners(boxes, w, h)
        boxes = boxes[keep]
    ow, oh = plan.out_size
    boxes *= np.array([ow / w, oh / h, ow / w, oh / h])
    return boxes, keep


def source_rectangle(width: int, height: int, plan: GeometricPlan) -> Tuple[float, float, float, float]:
    """The region (x0, y0, x1, y1) of the *unflipped* source picture that becomes the output.

    Inside the picture by construction: ``0 <= x0 < x1 <= width`` and ``0 <= y0 < y1 <= height``.
    The crop's integer edges are mapped with one rounding each (``edge * width / rw``: an exact
    integer product, then one correctly rounded division), so an edge at ``rw`` maps to exactly
    ``width`` and the flip ``width - x`` cannot go below 0. The clamps only guard the invariant.
    """
    if plan.crop is None:
        return 0.0, 0.0, float(width), float(height)
    rw, rh = plan.crop_resize
    left, top, cw, ch = plan.crop
    x0, x1 = left * width / rw, (left + cw) * width / rw
    y0, y1 = top * height / rh, (top + ch) * height / rh
    if plan.flip:
        x0, x1 = width - x1, width - x0
    x0, x1 = min(max(x0, 0.0), float(width)), min(max(x1, 0.0), float(width))
    y0, y1 = min(max(y0, 0.0), float(height)), min(max(y1, 0.0), float(height))
    return x0, y0, x1, y1


def check_plan(width: int, height: int, plan: GeometricPlan) -> None:
    """Raise ``ValueError`` unless ``plan`` is renderable for a ``width x height`` picture."""
    if width < 1 or height < 1:
        raise ValueError(f"the picture is {width} x {height} pixels")
    if min(plan.out_size) < 1:
        raise ValueError(f"output size {plan.out_size}")
    if plan.crop is not None:
        rw, rh = plan.crop_resize
        left, top, cw, ch = plan.crop
        if not (0 <= left and 0 <= top and cw >= 1 and ch >= 1 and left + cw <= rw and top + ch <= rh):
            raise ValueError(f"crop {plan.crop} is not inside the resized picture {plan.crop_resize}")


# --- pixels --------------------------------------------------------------------------------------
def render(encoded: bytes, width: int, height: int, plan: GeometricPlan) -> Image.Image:
    """Decode ``encoded`` and produce the plan's output picture (RGB, ``plan.out_size``).

    ``width``/``height``: the picture's size as recorded by the ingest; a file whose decoded size
    differs raises ``ValueError`` (its boxes would not line up).
    """
    check_plan(width, height, plan)
    x0, y0, x1, y1 = source_rectangle(width, height, plan)
    out_w, out_h = plan.out_size
    picture = Image.open(io.BytesIO(encoded))
    if picture.size != (width, height):
        raise ValueError(f"the file decodes to {picture.size[0]} x {picture.size[1]} pixels, "
                         f"the shard records {width} x {height}")
    if picture.format == "JPEG":
        reduction = min(out_w / (x1 - x0), out_h / (y1 - y0))
        if reduction < 0.5:  # libjpeg can decode at 1/2, 1/4, 1/8 scale for a fraction of the cost
            picture.draft("RGB", (math.ceil(width * reduction), math.ceil(height * reduction)))
            # libjpeg rounds the reduced size up: its picture spans the whole source, so the
            # rectangle scales by the size ratio and is clamped to the reduced picture again
            dw, dh = picture.size
            sx, sy = dw / width, dh / height
            x0, x1 = min(x0 * sx, float(dw)), min(x1 * sx, float(dw))
            y0, y1 = min(y0 * sy, float(dh)), min(y1 * sy, float(dh))
    if picture.mode != "RGB":
        picture = picture.convert("RGB")
    picture = picture.resize((out_w, out_h), Image.BILINEAR, box=(x0, y0, x1, y1))
    return picture.transpose(Image.FLIP_LEFT_RIGHT) if plan.flip else picture


def to_chw(picture: Image.Image) -> np.ndarray:
    """RGB picture -> ``uint8 [3, h, w]``."""
    return np.ascontiguousarray(np.asarray(picture).transpose(2, 0, 1))


def normalize_into(out: np.ndarray, chw: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Write ``uint8 [3, h, w]`` pixels into ``out`` (float32, same shape) standardised with
    ``mean``/``std`` (statistics of 0..1 values); returns ``out``."""
    std = np.asarray(std, dtype=np.float32)
    np.multiply(chw, (1.0 / (255.0 * std))[:, None, None], out=out, casting="unsafe")
    out -= (np.asarray(mean, dtype=np.float32) / std)[:, None, None]
    return out


def normalize(picture: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """RGB picture -> ``float32 [3, h, w]`` standardised with ``mean``/``std`` (of 0..1 values)."""
    chw = to_chw(picture)
    return normalize_into(np.empty(chw.shape, np.float32), chw, mean, std)


def coco_boxes_to_corners(boxes_xywh: np.ndarray, iscrowd: np.ndarray, width: int, height: int) -> Tuple[np.ndarray, np.ndarray]:
    """Official target preparation: drop crowd boxes, xywh -> clipped corners, drop empty ones.

    Returns ``(corners [m, 4], keep [n] bool)``.
    """
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    corners = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
    keep = (np.asarray(iscrowd).reshape(-1) == 0) & _clip_corners(corners, width, height)
    return corners[keep], keep


def make_sample(encoded: bytes, width: int, height: int, boxes_xywh: np.ndarray, category_ids: np.ndarray,
                iscrowd: np.ndarray, image_id: int, plan: GeometricPlan) -> Dict[str, np.ndarray]:
    """One transformed sample.

    Returns ``image uint8 [3, h, w]`` (RGB; ``collate`` normalises it), ``labels int64 [n]``,
    ``boxes float32 [n, 4] (cx, cy, w, h) in [0, 1]``, ``image_id int64``,
    ``orig_size int64 [2] (h, w)``, ``size int64 [2] (h, w)``.
    """
    corners, keep = coco_boxes_to_corners(boxes_xywh, iscrowd, width, height)
    labels = np.asarray(category_ids, dtype=np.int64).reshape(-1)[keep]
    corners, kept = transform_boxes(corners, width, height, plan)
    out_w, out_h = plan.out_size
    cxcywh = np.concatenate([(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], axis=1)
    return {
        "image": to_chw(render(encoded, width, height, plan)),
        "labels": labels[kept],
        "boxes": (cxcywh / [out_w, out_h, out_w, out_h]).astype(np.float32),
        "image_id": np.int64(image_id),
        "orig_size": np.array([height, width], dtype=np.int64),
        "size": np.array([out_h, out_w], dtype=np.int64),
    }


def sample_rng(seed: int, epoch: int, image_id: int) -> np.random.Generator:
    """The random stream of one image in one epoch: independent of order, worker and batch."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, image_id % (1 << 63)])
