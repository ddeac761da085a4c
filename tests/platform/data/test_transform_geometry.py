"""Property tests of the augmentation geometry (issue: 1 in 1,400 training samples crashed in PIL).

A seeded sweep of 120,000 plans over picture sizes 1-4000 px, every official ``transform.scale``,
both branches, flip on and off, checks the source rectangle and the output size of every plan;
a seeded sample of them is rendered and checked pixel by pixel (a drawn box lands where
``transform_boxes`` says). Measured: 22 s for the file on the shared 2-core machine (load ~20).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dino_platform.data.transforms import (
    EvalTransformConfig, GeometricPlan, TrainTransformConfig, eval_plan, make_sample, render, sample_rng, sample_train_plan, source_rectangle, transform_boxes,
)

# the factors the presets and docs use, and the official recipe itself (1.0)
SCALES = (0.2, 0.25, 0.4, 0.5, 0.6, 0.8, 1.0)
NUM_PLANS = 120_000


def _sizes(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, 2] picture sizes, log-uniform in 1..4000 per side, with the edges of the range forced in."""
    sizes = np.exp(rng.uniform(0, np.log(4000), size=(n, 2))).astype(int).clip(1, 4000)
    edges = np.array([[1, 1], [1, 4000], [4000, 1], [4000, 4000], [2, 3], [640, 480], [333, 500]])
    sizes[: len(edges)] = edges
    return sizes


def _float_far_edge(width: int, rw: int, left: int, cw: int) -> float:
    """The right edge of the crop mapped back in floats, ``(left + cw) * width / rw``: it can overshoot ``width``."""
    return (left + cw) * (width / rw)


def test_every_plan_is_inside_the_picture_and_has_the_planned_size():
    rng = np.random.default_rng(20261201)
    sizes = _sizes(rng, NUM_PLANS)
    configs = [TrainTransformConfig.scaled(f) for f in SCALES]
    rects, outs, pictures = np.empty((NUM_PLANS, 4)), np.empty((NUM_PLANS, 2)), sizes.astype(float)
    seen = set()
    overshooting = 0
    for i, (width, height) in enumerate(sizes.tolist()):
        k = i % len(configs)
        plan = sample_train_plan(width, height, configs[k], sample_rng(7, i // 1000, i))
        rects[i] = source_rectangle(width, height, plan)
        outs[i] = plan.out_size
        branch = plan.crop is not None
        seen.add((k, branch, plan.flip))
        if branch:
            rw, _ = plan.crop_resize
            left, _, cw, _ = plan.crop
            # a far edge past ``width`` mirrors to a negative offset unless the geometry clamps it
            overshooting += plan.flip and _float_far_edge(width, rw, left, cw) > width
            assert 0 <= left and left + cw <= plan.crop_resize[0] and 0 <= plan.crop[1]
            assert plan.crop[1] + plan.crop[3] <= plan.crop_resize[1]
    assert len(seen) == 4 * len(configs), "every scale x branch x flip combination is drawn"
    assert overshooting > 0, "the sweep must contain plans whose float far edge overshoots the picture"
    x0, y0, x1, y1 = rects.T
    assert np.all(x0 >= 0) and np.all(y0 >= 0), "near edge below 0"
    assert np.all(x1 <= pictures[:, 0]) and np.all(y1 <= pictures[:, 1]), "far edge past the picture"
    assert np.all(x1 > x0) and np.all(y1 > y0), "empty source rectangle"
    assert np.all(outs >= 1), "an output side of 0 pixels"


@pytest.mark.parametrize("width,height", [(1, 1), (1, 4000), (4000, 1), (3, 2000), (4000, 4000), (7, 5)])
def test_degenerate_pictures_get_at_least_one_pixel(width, height):
    for cfg in (TrainTransformConfig.scaled(0.2), TrainTransformConfig()):
        for seed in range(30):
            plan = sample_train_plan(width, height, cfg, np.random.default_rng(seed))
            assert min(plan.out_size) >= 1
        ew, eh = eval_plan(width, height, EvalTransformConfig(short_side=160, max_size=266)).out_size
        assert ew >= 1 and eh >= 1


def _picture_with_box(width: int, height: int, box, fmt: str) -> bytes:
    picture = Image.new("RGB", (width, height), (0, 0, 0))
    ImageDraw.Draw(picture).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 255, 255))
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _measured_extent(profile: np.ndarray):
    # half of the line's own peak: near a corner the other axis' blur lowers the whole line
    # (the filter is separable), which would move a fixed threshold's crossing
    inside = np.flatnonzero(profile > profile.max() / 2)
    return (int(inside[0]), int(inside[-1]) + 1) if len(inside) else None


def _check_box_lands(encoded: bytes, width: int, height: int, box, plan: GeometricPlan) -> bool:
    """Render; the white box's edges (half-peak crossing along its middle row/column) must lie within
    1 output pixel of ``transform_boxes``. Returns whether the box was measurable."""
    out = render(encoded, width, height, plan)
    assert out.size == plan.out_size and out.mode == "RGB"
    moved, keep = transform_boxes(np.array([box], float), width, height, plan)
    if not keep[0]:
        return False
    bx0, by0, bx1, by1 = moved[0]
    if bx1 - bx0 < 4 or by1 - by0 < 4:  # too small to have a 50 % plateau after resampling
        return False
    gray = np.asarray(out.convert("L"), dtype=np.float64)
    row, col = int((by0 + by1) / 2), int((bx0 + bx1) / 2)
    horizontal, vertical = _measured_extent(gray[row]), _measured_extent(gray[:, col])
    assert horizontal is not None and vertical is not None, (plan, moved)
    assert abs(horizontal[0] - bx0) <= 1 and abs(horizontal[1] - bx1) <= 1, (width, height, box, plan, moved, horizontal)
    assert abs(vertical[0] - by0) <= 1 and abs(vertical[1] - by1) <= 1, (width, height, box, plan, moved, vertical)
    return True


def test_rendered_boxes_land_where_transform_boxes_says():
    """~600 renders: PNG and JPEG (the reduced ``draft`` decode), both branches, flip on/off."""
    rng = np.random.default_rng(11)
    configs = [TrainTransformConfig.scaled(f) for f in (0.2, 0.4, 1.0)]
    measured = drafted = flips = crops = 0
    for picture_index in range(150):
        if picture_index < 10:  # large pictures: the reduced JPEG decode path
            width, height = int(rng.integers(1500, 4001)), int(rng.integers(1500, 4001))
        else:
            width, height = (int(v) for v in np.exp(rng.uniform(np.log(8), np.log(1200), 2)))
        fmt = "JPEG" if picture_index % 2 == 0 else "PNG"
        bw, bh = max(1, int(width * rng.uniform(0.2, 0.6))), max(1, int(height * rng.uniform(0.2, 0.6)))
        bx, by = int(rng.integers(0, width - bw + 1)), int(rng.integers(0, height - bh + 1))
        box = (bx, by, bx + bw, by + bh)
        encoded = _picture_with_box(width, height, box, fmt)
        for j in range(4):
            cfg = configs[(picture_index + j) % len(configs)]
            plan = sample_train_plan(width, height, cfg, rng)
            measured += _check_box_lands(encoded, width, height, box, plan)
            flips += plan.flip
            crops += plan.crop is not None
            drafted += fmt == "JPEG" and width >= 1500
        _check_box_lands(encoded, width, height, box, eval_plan(width, height, EvalTransformConfig(160, 266)))
    assert measured > 400 and flips > 100 and crops > 100 and drafted >= 20


def test_flipped_crops_at_the_right_edge_render():
    """Crop plans touching the right edge with a flip, where a float mapping of the far edge overshoots."""
    rng = np.random.default_rng(5)
    cfg = TrainTransformConfig.scaled(0.2)
    found = 0
    for i in range(200_000):
        width, height = int(rng.integers(200, 1001)), int(rng.integers(200, 1001))
        plan = sample_train_plan(width, height, cfg, sample_rng(0, 0, i))
        if plan.crop is None or not plan.flip:
            continue
        left, _, cw, _ = plan.crop
        if _float_far_edge(width, plan.crop_resize[0], left, cw) <= width:
            continue
        box = (width // 4, height // 4, width // 4 * 3, height // 4 * 3)
        _check_box_lands(_picture_with_box(width, height, box, "PNG"), width, height, box, plan)
        found += 1
        if found == 20:
            break
    assert found == 20


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1", "I;16", "CMYK", "I", "F"])
def test_any_decodable_mode_renders(mode):
    picture = Image.new("RGB", (37, 23), (200, 30, 90)).convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG" if mode == "CMYK" else ("TIFF" if mode in ("F", "I") else "PNG"))
    plan = sample_train_plan(37, 23, TrainTransformConfig.scaled(0.2), np.random.default_rng(1))
    sample = make_sample(buffer.getvalue(), 37, 23, np.array([[2, 3, 10, 10]]), np.array([1]), np.array([0]), 9, plan)
    assert sample["image"].shape == (3, plan.out_size[1], plan.out_size[0])
