"""Small, real-looking detection datasets for demos and tests: JPEGs + a COCO-style JSON.

Eight object classes that exist in both Objects365 and COCO (person, car, bottle, cup, chair,
clock, umbrella, stop sign), each with its own shape and colour family so a tiny detector can
learn them, drawn over a textured background with clutter, partial occlusion and objects cut by
the image border. Category ids and names follow the real datasets, so the Objects365 -> COCO class
transfer runs on a synthetic pair:

- ``kind="o365"``: all 365 Objects365 v2 categories (ids 1..365); images under ``images/patchN/``
  while the JSON says ``images/v2/patchN/objects365_v2_XXXXXXXX.jpg`` (as the real release does),
  annotations carry ``isfake``/``isreflected``; no segmentation.
- ``kind="coco"``: the 80 COCO categories with their ids (1..90, non-contiguous), non-contiguous
  image ids, polygon segmentation, and occasional ``iscrowd=1`` groups with RLE segmentation.

The output is a pure function of (kind, images, seed, size): every image is drawn from its own
random generator seeded by ``(seed, index)``.
"""
from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Literal, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dino_platform.data.categories import coco_categories, o365_to_coco_names, objects365_categories
from dino_platform.errors import ConfigError
from dino_platform.storage import resolve

log = logging.getLogger(__name__)

SynthKind = Literal["o365", "coco"]
IMAGES_PER_PATCH = 50        # Objects365 spreads images over patchN/ folders; ours are small
MIN_VISIBLE_FRACTION = 0.45  # placements that hide more of an earlier object are retried
EMPTY_IMAGE_PROBABILITY = 0.05
CROWD_PROBABILITY = 0.12     # COCO only: a group of small people annotated as one iscrowd box


@dataclass(frozen=True)
class SynthConfig:
    kind: SynthKind = "coco"
    images: int = 64
    seed: int = 0
    size: Tuple[int, int] = (320, 240)  # nominal (width, height); each image varies by +-20%
    max_objects: int = 6

    def __post_init__(self) -> None:
        if self.kind not in ("o365", "coco"):
            raise ConfigError(f"kind: {self.kind!r} is not one of 'o365', 'coco'")
        if self.images < 1:
            raise ConfigError(f"images: must be >= 1, got {self.images}")
        if len(self.size) != 2 or min(self.size) < 64:
            raise ConfigError(f"size: (width, height) of at least 64 pixels each, got {self.size}")
        if self.max_objects < 1:
            raise ConfigError(f"max_objects: must be >= 1, got {self.max_objects}")


def category_ids(kind: SynthKind) -> Dict[str, int]:
    """COCO name of each drawn class -> its category id in the ``kind`` label space."""
    if kind == "coco":
        by_name = {name: cid for cid, name in coco_categories().items()}
        return {name: by_name[name] for name in SYNTH_CLASSES}
    coco_to_o365 = {coco: o365 for o365, coco in o365_to_coco_names().items()}
    by_name = {name: cid for cid, name in objects365_categories().items()}
    return {name: by_name[coco_to_o365[name]] for name in SYNTH_CLASSES}


# --- shapes: each draws its silhouette into a mask (fill=255) and its details onto the picture ----
Box = Tuple[float, float, float, float]  # x0, y0, x1, y1 of the object's extent


def _person(mask: ImageDraw.ImageDraw, draw: ImageDraw.ImageDraw, b: Box, rng) -> List[List[float]]:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    r = min(w * 0.28, h * 0.12)
    cx = (x0 + x1) / 2
    head = [cx - r, y0, cx + r, y0 + 2 * r]
    body = [(cx - w * 0.3, y0 + 2.2 * r), (cx + w * 0.3, y0 + 2.2 * r), (x1, y0 + h * 0.6),
            (cx + w * 0.2, y0 + h * 0.6), (cx + w * 0.25, y1), (cx - w * 0.25, y1),
            (cx - w * 0.2, y0 + h * 0.6), (x0, y0 + h * 0.6)]
    mask.ellipse(head, fill=255)
    mask.polygon(body, fill=255)
    draw.ellipse(head, fill=(226, 180, 150))
    return [_ellipse_polygon(head), [c for p in body for c in p]]


def _car(mask, draw, b, rng):
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    body = [(x0, y0 + h * 0.4), (x1, y0 + h * 0.4), (x1, y0 + h * 0.85), (x0, y0 + h * 0.85)]
    cabin = [(x0 + w * 0.2, y0 + h * 0.4), (x0 + w * 0.32, y0), (x0 + w * 0.7, y0),
             (x0 + w * 0.82, y0 + h * 0.4)]
    wheels = [[x0 + w * f - h * 0.17, y1 - h * 0.34, x0 + w * f + h * 0.17, y1] for f in (0.22, 0.78)]
    for part in (body, cabin):
        mask.polygon(part, fill=255)
    for wheel in wheels:
        mask.ellipse(wheel, fill=255)
    draw.polygon([(x0 + w * 0.35, y0 + h * 0.08), (x0 + w * 0.66, y0 + h * 0.08),
                  (x0 + w * 0.74, y0 + h * 0.36), (x0 + w * 0.28, y0 + h * 0.36)], fill=(200, 225, 240))
    for wheel in wheels:
        draw.ellipse(wheel, fill=(25, 25, 25))
    return [[c for p in body + cabin for c in p]] + [_ellipse_polygon(wh) for wh in wheels]


def _bottle(mask, draw, b, rng):
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    outline = [(x0 + w * 0.35, y0), (x0 + w * 0.65, y0), (x0 + w * 0.65, y0 + h * 0.25),
               (x1, y0 + h * 0.4), (x1, y1), (x0, y1), (x0, y0 + h * 0.4), (x0 + w * 0.35, y0 + h * 0.25)]
    mask.polygon(outline, fill=255)
    draw.rectangle([x0 + w * 0.1, y0 + h * 0.55, x1 - w * 0.1, y0 + h * 0.75], fill=(240, 240, 230))
    return [[c for p in outline for c in p]]


def _cup(mask, draw, b, rng):
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    body = [(x0, y0), (x0 + w * 0.75, y0), (x0 + w * 0.65, y1), (x0 + w * 0.1, y1)]
    handle = [x0 + w * 0.6, y0 + h * 0.2, x1, y0 + h * 0.7]
    mask.polygon(body, fill=255)
    mask.ellipse(handle, outline=255, width=max(2, int(w * 0.08)))
    return [[c for p in body for c in p], _ellipse_polygon(handle)]


def _chair(mask, draw, b, rng):
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    t = max(2.0, w * 0.14)
    parts = [[x0, y0, x0 + t, y1], [x0, y0 + h * 0.5, x1, y0 + h * 0.5 + t], [x1 - t, y0 + h * 0.5, x1, y1]]
    for part in parts:
        mask.rectangle(part, fill=255)
    return [[p[0], p[1], p[2], p[1], p[2], p[3], p[0], p[3]] for p in parts]


def _clock(mask, draw, b, rng):
    x0, y0, x1, y1 = b
    mask.ellipse(b, fill=255)
    ring = max(2, int((x1 - x0) * 0.08))
    draw.ellipse(b, outline=(20, 20, 20), width=ring)
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    for angle, length in ((rng.uniform(0, 2 * math.pi), 0.7), (rng.uniform(0, 2 * math.pi), 0.45)):
        draw.line([cx, cy, cx + r * length * math.cos(angle), cy + r * length * math.sin(angle)],
                  fill=(20, 20, 20), width=max(1, ring // 2))
    return [_ellipse_polygon(b)]


def _umbrella(mask, draw, b, rng):
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    canopy = [x0, y0, x1, y0 + h * 1.1]
    mask.pieslice(canopy, 180, 360, fill=255)
    stick = [x0 + w * 0.48, y0 + h * 0.5, x0 + w * 0.52, y1]
    mask.rectangle(stick, fill=255)
    draw.rectangle(stick, fill=(60, 40, 30))
    arc = _ellipse_polygon(canopy)
    return [arc[: len(arc) // 2 + 2], [stick[0], stick[1], stick[2], stick[1], stick[2], stick[3], stick[0], stick[3]]]


def _stop_sign(mask, draw, b, rng):
    x0, y0, x1, y1 = b
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    octagon = [(cx + r * math.cos(math.pi / 8 + k * math.pi / 4), cy + r * math.sin(math.pi / 8 + k * math.pi / 4))
               for k in range(8)]
    mask.polygon(octagon, fill=255)
    draw.rectangle([cx - r * 0.6, cy - r * 0.12, cx + r * 0.6, cy + r * 0.12], fill=(245, 245, 245))
    return [[c for p in octagon for c in p]]


def _ellipse_polygon(b: Box, points: int = 16) -> List[float]:
    x0, y0, x1, y1 = b
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return [v for k in range(points) for v in (cx + rx * math.cos(2 * math.pi * k / points),
                                               cy + ry * math.sin(2 * math.pi * k / points))]


# class -> (draw function, width/height aspect, base colour (RGB))
_SHAPES: Dict[str, Tuple[Callable, float, Tuple[int, int, int]]] = {
    "person": (_person, 0.42, (200, 40, 40)),
    "car": (_car, 1.9, (30, 70, 200)),
    "bottle": (_bottle, 0.34, (30, 150, 60)),
    "cup": (_cup, 1.05, (235, 200, 40)),
    "chair": (_chair, 0.65, (130, 80, 35)),
    "clock": (_clock, 1.0, (250, 250, 245)),
    "umbrella": (_umbrella, 1.5, (150, 40, 170)),
    "stop sign": (_stop_sign, 1.0, (215, 20, 30)),
}
# COCO names of the drawn classes; their Objects365 names come from o365_to_coco.json
SYNTH_CLASSES: Tuple[str, ...] = tuple(_SHAPES)


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    top, bottom = rng.integers(40, 220, size=3), rng.integers(40, 220, size=3)
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    pixels = top[None, None, :] * (1 - ramp) + bottom[None, None, :] * ramp
    pixels = np.broadcast_to(pixels, (height, width, 3)) + rng.normal(0, 9, size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):  # unlabelled clutter: grey lines and boxes
        grey = int(rng.integers(60, 200))
        x, y = rng.uniform(0, width, 2), rng.uniform(0, height, 2)
        if rng.random() < 0.5:
            draw.line([x[0], y[0], x[1], y[1]], fill=(grey,) * 3, width=int(rng.integers(1, 4)))
        else:
            draw.rectangle([min(x), min(y), max(x), max(y)], outline=(grey,) * 3, width=2)
    return image.filter(ImageFilter.GaussianBlur(0.6))


def _jitter(rng, base: Tuple[int, int, int]) -> Tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.normal(0, 18), 0, 255)) for c in base)


def _rle(mask: np.ndarray) -> Dict[str, object]:
    """COCO's uncompressed RLE of a boolean [h, w] mask (column-major runs, starting with zeros)."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def draw_image(cfg: SynthConfig, index: int) -> Tuple[Image.Image, List[dict]]:
    """Picture ``index`` of the dataset and its objects (COCO names, xywh boxes, areas, segmentation)."""
    rng = np.random.default_rng([cfg.seed, index])
    width = int(round(cfg.size[0] * rng.uniform(0.8, 1.2)))
    height = int(round(cfg.size[1] * rng.uniform(0.8, 1.2)))
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    count = 0 if rng.random() < EMPTY_IMAGE_PROBABILITY else int(rng.integers(1, cfg.max_objects + 1))
    placed: List[dict] = []  # each with a "visible" boolean mask
    for _ in range(count):
        name = SYNTH_CLASSES[int(rng.integers(len(SYNTH_CLASSES)))]
        shape, aspect, colour = _SHAPES[name]
        for _attempt in range(20):
            h = rng.uniform(0.18, 0.6) * min(width, height)
            w = h * aspect * rng.uniform(0.85, 1.15)
            if w > 0.95 * width:  # wide shapes in narrow pictures: shrink, keeping the aspect
                w, h = 0.95 * width, h * 0.95 * width / w
            margin = 0.25 if rng.random() < 0.2 else 0.0  # sometimes cut by the border
            x0 = rng.uniform(-margin * w, width - w * (1 - margin))
            y0 = rng.uniform(-margin * h, height - h * (1 - margin))
            silhouette = Image.new("L", (width, height), 0)
            shape(ImageDraw.Draw(silhouette), ImageDraw.Draw(Image.new("RGB", (1, 1))), (x0, y0, x0 + w, y0 + h),
                  np.random.default_rng(0))
            candidate = np.asarray(silhouette) > 127
            if candidate.sum() < 30:
                continue
            if all((p["visible"] & ~candidate).sum() >= MIN_VISIBLE_FRACTION * p["full"] for p in placed):
                break
        else:
            continue
        image.paste(_jitter(rng, colour), mask=silhouette)
        polygons = shape(ImageDraw.Draw(Image.new("L", (width, height))), draw, (x0, y0, x0 + w, y0 + h), rng)
        for p in placed:
            p["visible"] &= ~candidate
        placed.append({"name": name, "visible": candidate, "full": int(candidate.sum()),
                       "segmentation": [[round(float(v), 2) for v in poly] for poly in polygons],
                       "iscrowd": 0})
    if cfg.kind == "coco" and rng.random() < CROWD_PROBABILITY:
        placed.append(_crowd(image, rng, width, height, placed))
    objects = []
    for p in placed:
        ys, xs = np.nonzero(p["visible"])
        if len(xs) == 0:
            continue
        x0, y0 = float(xs.min()), float(ys.min())
        objects.append({"name": p["name"], "bbox": [x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0],
                        "area": float(len(xs)), "iscrowd": p["iscrowd"],
                        "segmentation": _rle(p["visible"]) if p["iscrowd"] else p["segmentation"]})
    return image, objects


def _crowd(image: Image.Image, rng, width: int, height: int, placed: List[dict]) -> dict:
    """A tight group of small people drawn over everything and annotated as one crowd region."""
    draw = ImageDraw.Draw(image)
    silhouette = Image.new("L", (width, height), 0)
    unit = min(width, height) * 0.09
    gx, gy = rng.uniform(0, width - 6 * unit), rng.uniform(0, height - 2.5 * unit)
    for k in range(int(rng.integers(5, 10))):
        left = gx + k * unit * 0.6
        x0, y0 = left + rng.uniform(0, unit * 0.3), gy + rng.uniform(0, unit * 0.5)
        _person(ImageDraw.Draw(silhouette), draw, (x0, y0, max(left + unit * 0.45, x0 + 3), gy + unit * 2.2), rng)
    crowd = np.asarray(silhouette) > 127
    image.paste(_jitter(rng, _SHAPES["person"][2]), mask=silhouette)
    for p in placed:
        p["visible"] &= ~crowd
    return {"name": "person", "visible": crowd, "full": int(crowd.sum()), "iscrowd": 1}


def generate(cfg: SynthConfig, out_uri: str) -> Dict[str, int]:
    """Write ``images/`` and ``annotations.json`` under ``out_uri``; return image/annotation counts."""
    out = resolve(out_uri)
    ids = category_ids(cfg.kind)
    categories = objects365_categories() if cfg.kind == "o365" else coco_categories()
    if cfg.kind == "o365":
        image_ids = list(range(1, cfg.images + 1))
    else:  # COCO's image ids are sparse and unordered with respect to file creation
        rng = np.random.default_rng([cfg.seed, 2 ** 31])
        drawn = rng.choice(np.arange(1, max(1000, cfg.images * 50)), cfg.images, replace=False)
        image_ids = sorted(int(i) for i in drawn)
    images, annotations = [], []
    for index, image_id in enumerate(image_ids):
        picture, objects = draw_image(cfg, index)
        if cfg.kind == "o365":
            relative = f"patch{index // IMAGES_PER_PATCH}/objects365_v2_{image_id:08d}.jpg"
            file_name = f"images/v2/{relative}"  # the release's JSON names a longer path than on disk
        else:
            relative = file_name = f"{image_id:012d}.jpg"
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=90)
        out.child(f"images/{relative}").write_bytes(buffer.getvalue())
        images.append({"id": image_id, "file_name": file_name, "width": picture.width, "height": picture.height})
        for obj in objects:
            annotation = {"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[obj["name"]],
                          "bbox": obj["bbox"], "area": obj["area"], "iscrowd": obj["iscrowd"]}
            if cfg.kind == "o365":
                annotation.update(isfake=0, isreflected=0)
            else:
                annotation["segmentation"] = obj["segmentation"]
            annotations.append(annotation)
        if (index + 1) % 100 == 0:
            log.info("synth: %d/%d images", index + 1, cfg.images)
    document = {
        "info": {"description": f"dino-platform synthetic {cfg.kind} dataset", "seed": cfg.seed},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name} for cid, name in sorted(categories.items())],
    }
    out.child("annotations.json").write_bytes(json.dumps(document).encode("utf-8"))
    return {"images": len(images), "annotations": len(annotations)}
