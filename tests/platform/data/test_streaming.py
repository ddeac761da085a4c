"""Transforms (boxes and pixels agree, against hand-computed values), collate, and the Ray Data path."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dino_platform.data.transforms import (
    EvalTransformConfig, GeometricPlan, TrainTransformConfig, coco_boxes_to_corners, eval_plan, make_sample,
    resized_size, sample_rng, sample_train_plan, transform_boxes, transform_configs,
)
from dino_platform.data.streaming import collate
from dino_platform.errors import ConfigError

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def test_resized_size_follows_the_official_rule():
    assert resized_size(640, 480, 800, 1333) == (1066, 800)       # 800 * 640 / 480 = 1066.7, truncated
    assert resized_size(480, 640, 800, 1333) == (800, 1066)
    assert resized_size(1000, 200, 800, 1333) == (1335, 267)      # capped: short = round(1333 * 200 / 1000)
    assert resized_size(600, 800, 600, None) == (600, 800)        # already there
    assert resized_size(320, 240, 320, 512) == (426, 320)


def test_flip_boxes():
    boxes, keep = transform_boxes(np.array([[10.0, 20, 30, 40]]), 100, 50, GeometricPlan(True, None, None, (100, 50)))
    np.testing.assert_allclose(boxes, [[70, 20, 90, 40]])
    assert keep.tolist() == [True]


def test_crop_branch_boxes_by_hand():
    # 200x100 picture -> resized to 400x200 -> crop 100x100 at (left 50, top 20) -> 160x160
    plan = GeometricPlan(False, (400, 200), (50, 20, 100, 100), (160, 160))
    boxes, keep = transform_boxes(np.array([[10.0, 10, 60, 50], [0, 0, 20, 5], [30, 20, 40, 30]]), 200, 100, plan)
    # box 1: x2 -> [20,20,120,100] - (50,20) -> [-30,0,70,80] -> clip [0,0,70,80] -> x1.6
    # box 2: x2 -> [0,0,40,10] - (50,20) -> entirely left/above the crop -> dropped
    # box 3: x2 -> [60,40,80,60] - (50,20) -> [10,20,30,40] -> x1.6
    np.testing.assert_allclose(boxes, [[0, 0, 112, 128], [16, 32, 48, 64]])
    assert keep.tolist() == [True, False, True]
    flipped, _ = transform_boxes(np.array([[10.0, 10, 60, 50]]), 200, 100, GeometricPlan(True, (400, 200), (50, 20, 100, 100), (160, 160)))
    # flip first: [140,10,190,50] -> x2 [280,20,380,100] - (50,20) -> [230,0,330,80] -> clip x to 100: empty
    assert flipped.shape == (0, 4)


def test_target_preparation_drops_crowd_and_empty_boxes():
    corners, keep = coco_boxes_to_corners(np.array([[10, 10, 5, 5], [0, 0, 4, 4], [95, 5, 10, 10], [100, 5, 3, 3]]),
                                          np.array([0, 1, 0, 0]), 100, 50)
    np.testing.assert_allclose(corners, [[10, 10, 15, 15], [95, 5, 100, 15]])
    assert keep.tolist() == [True, False, True, False]


def _picture_with_square(width=200, height=120, box=(120, 30, 170, 90), quality=95) -> bytes:
    pixels = np.full((height, width, 3), (40, 90, 160), np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = (250, 200, 20)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.mark.parametrize("seed", range(12))
def test_pixels_and_boxes_agree_after_augmentation(seed):
    """Whatever flip/resize/crop is drawn, the square's pixels land inside its transformed box."""
    encoded = _picture_with_square()
    cfg = TrainTransformConfig(scales=(96, 128, 160), max_size=400, crop_resize_scales=(100, 120),
                               crop_min=60, crop_max=110)
    plan = sample_train_plan(200, 120, cfg, sample_rng(seed, 0, 1))
    sample = make_sample(encoded, 200, 120, np.array([[120, 30, 50, 60]]), np.array([44]), np.array([0]), 1, plan)
    h, w = sample["size"]
    assert sample["image"].shape == (3, h, w) and sample["image"].dtype == np.uint8
    assert sample["orig_size"].tolist() == [120, 200]
    rgb = sample["image"].transpose(1, 2, 0).astype(float)
    yellow = (rgb[..., 0] > 180) & (rgb[..., 2] < 110)
    if len(sample["boxes"]) == 0:  # cropped away: no yellow may remain (allow edge blur)
        assert yellow.sum() <= 2 * (h + w)
        return
    assert sample["labels"].tolist() == [44]
    cx, cy, bw, bh = sample["boxes"][0] * np.array([w, h, w, h])
    ys, xs = np.nonzero(yellow)
    assert abs(xs.min() - (cx - bw / 2)) <= 1.5 and abs(xs.max() + 1 - (cx + bw / 2)) <= 1.5
    assert abs(ys.min() - (cy - bh / 2)) <= 1.5 and abs(ys.max() + 1 - (cy + bh / 2)) <= 1.5


def test_large_downscale_uses_reduced_decode_and_stays_aligned():
    encoded = _picture_with_square(width=1600, height=960, box=(960, 240, 1360, 720))
    sample = make_sample(encoded, 1600, 960, np.array([[960, 240, 400, 480]]), np.array([1]), np.array([0]), 1,
                         eval_plan(1600, 960, EvalTransformConfig(short_side=120, max_size=400)))
    assert sample["size"].tolist() == [120, 200]
    np.testing.assert_allclose(sample["boxes"][0], [0.725, 0.5, 0.25, 0.5], atol=1e-6)
    rgb = sample["image"].transpose(1, 2, 0).astype(float)
    assert rgb[60, 145, 0] > 200 and rgb[60, 50, 2] > 120  # inside the square / background


def test_augmentation_is_a_function_of_seed_epoch_and_image():
    cfg = TrainTransformConfig()
    plans = lambda seed, epoch: [sample_train_plan(640, 480, cfg, sample_rng(seed, epoch, i)) for i in range(20)]
    assert plans(0, 0) == plans(0, 0)
    assert plans(0, 0) != plans(0, 1) and plans(0, 0) != plans(1, 0)
    kinds = {(p.flip, p.crop is None) for p in plans(0, 0)}
    assert len(kinds) == 4  # both flips, both branches


def test_transform_configs_from_mapping():
    train, evaluation = transform_configs({"scale": 0.4})
    assert train.scales == (192, 224, 256, 288, 320) and train.max_size == 533
    assert train.crop_resize_scales == (160, 200, 240) and (train.crop_min, train.crop_max) == (154, 240)
    assert (evaluation.short_side, evaluation.max_size) == (320, 533)
    train, evaluation = transform_configs({"scales": [224, 256, 288, 320], "max_size": 512, "eval_short_side": 288})
    assert train.scales == (224, 256, 288, 320) and evaluation == EvalTransformConfig(288, 512)
    assert transform_configs(None) == (TrainTransformConfig(), EvalTransformConfig())
    with pytest.raises(ConfigError, match="transform.max_szie: unknown key"):
        transform_configs({"max_szie": 3})
    with pytest.raises(ConfigError, match="transform.crop_min/crop_max"):
        transform_configs({"crop_min": 700})


def _row(h, w, n, image_id):
    return {"image": np.full((3, h, w), image_id, np.uint8), "labels": np.arange(n, dtype=np.int64),
            "boxes": np.full((n, 4), 0.5, np.float32), "image_id": np.int64(image_id),
            "orig_size": np.array([h * 2, w * 2]), "size": np.array([h, w])}


def test_collate_pads_and_masks():
    rows = [_row(5, 7, 2, 1), _row(6, 4, 0, 2)]
    images, mask, targets = collate(rows)
    assert images.shape == (2, 3, 6, 7) and mask.shape == (2, 6, 7) and mask.dtype == torch.bool
    assert not mask[0, :5, :7].any() and mask[0, 5:, :].all()
    assert not mask[1, :6, :4].any() and mask[1, :, 4:].all()
    assert (images[1, :, :, 4:] == 0).all()  # padding is zero after normalisation, as in the official code
    expected = torch.tensor((2 / 255 - MEAN) / STD, dtype=torch.float32)
    torch.testing.assert_close(images[1, :, :6, :4], expected[:, None, None].expand(3, 6, 4))
    already_normalised = [dict(rows[0], image=np.full((3, 5, 7), 0.25, np.float32))]
    assert (collate(already_normalised)[0] == 0.25).all()
    assert targets[0]["labels"].tolist() == [0, 1] and targets[1]["boxes"].shape == (0, 4)
    assert targets[1]["image_id"].item() == 2 and targets[0]["size"].tolist() == [5, 7]
    padded, padded_mask, _ = collate(rows, pad_to_multiple=32)
    assert padded.shape == (2, 3, 32, 32) and padded_mask[:, 6:, :].all()
    # the numpy-batch form (what iter_batches(batch_format="numpy") yields) gives the same tensors
    as_batch = {key: np.stack([r[key] for r in rows]) for key in ("image_id", "orig_size", "size")}
    for key in ("image", "labels", "boxes"):  # ragged columns arrive as object arrays of arrays
        as_batch[key] = np.empty(len(rows), dtype=object)
        as_batch[key][:] = [r[key] for r in rows]
    batch_images, batch_mask, batch_targets = collate(as_batch)
    assert torch.equal(batch_images, images) and torch.equal(batch_mask, mask)
    assert batch_targets[0]["labels"].tolist() == [0, 1]


# --- through Ray Data --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def o365_and_coco(tmp_path_factory):
    from dino_platform.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("streaming")
    generate(SynthConfig(kind="o365", images=24, seed=11, size=(128, 96)), str(root / "o365"))
    generate(SynthConfig(kind="coco", images=20, seed=12, size=(128, 96)), str(root / "coco"))
    return root


def _upload(local_dir, uri):
    from dino_platform.storage import resolve

    source, target = resolve(str(local_dir)), resolve(uri)
    for name in source.list_files():
        target.child(name).write_bytes(source.child(name).read_bytes())


SMALL = {"scales": [96, 112, 128], "max_size": 200, "crop_resize_scales": [80, 96], "crop_min": 64, "crop_max": 96}


@pytest.mark.slow
def test_end_to_end_through_s3_and_ray(o365_and_coco, s3_bucket, ray_local):
    """Acceptance: both synthetic sets into the S3 endpoint with Ray tasks and back through Ray Data."""
    import json

    from dino_platform.data.ingest import IngestConfig, ingest
    from dino_platform.data.streaming import build_eval_dataset, build_train_dataset, dataset_size

    for kind in ("o365", "coco"):
        doc = json.loads((o365_and_coco / kind / "annotations.json").read_text())
        _upload(o365_and_coco / kind, f"{s3_bucket}/raw/{kind}")
        out = f"{s3_bucket}/shards/{kind}"
        manifest = ingest(IngestConfig(kind, f"{s3_bucket}/raw/{kind}/annotations.json",
                                       f"{s3_bucket}/raw/{kind}/images", out, shard_size=8, parallel=True))
        assert manifest.images == len(doc["images"]) and manifest.annotations == len(doc["annotations"])
        assert dataset_size(out) == len(doc["images"])

        evaluation = list(build_eval_dataset(out, SMALL).iter_rows())
        assert sorted(r["image_id"] for r in evaluation) == sorted(im["id"] for im in doc["images"])
        non_crowd = sum(1 for a in doc["annotations"] if not a["iscrowd"])
        assert sum(len(r["labels"]) for r in evaluation) == non_crowd
        assert all(min(r["size"]) == 128 or max(r["size"]) <= 200 for r in evaluation)

        batches = list(build_train_dataset(out, SMALL, seed=5).iter_batches(batch_size=4, batch_format="numpy"))
        images, mask, targets = collate(batches[0])
        assert images.shape[0] == len(targets) == 4 and mask.shape == (4,) + images.shape[2:]
        seen = [int(i) for b in batches for i in b["image_id"]]
        assert sorted(seen) == sorted(im["id"] for im in doc["images"])
        labels = {int(label) for b in batches for t in b["labels"] for label in t}
        assert labels <= set(manifest.categories)


@pytest.mark.slow
def test_streaming_split_and_per_epoch_reproducibility(o365_and_coco, tmp_path, ray_local):
    import ray

    from dino_platform.data.ingest import IngestConfig, ingest
    from dino_platform.data.streaming import build_train_dataset

    out = str(tmp_path / "shards")
    ingest(IngestConfig("o365", str(o365_and_coco / "o365/annotations.json"), str(o365_and_coco / "o365/images"),
                        out, shard_size=6, parallel=False))

    @ray.remote(num_cpus=0)  # the consumers must not take the CPUs the pipeline runs on
    def consume(split):
        return [int(i) for b in split.iter_batches(batch_size=3, batch_format="numpy") for i in b["image_id"]]

    first, second = build_train_dataset(out, SMALL, seed=3).streaming_split(2, equal=False)
    a, b = ray.get([consume.remote(first), consume.remote(second)])
    assert a and b and not set(a) & set(b) and sorted(a + b) == list(range(1, 25))

    def by_image(ds):
        return {int(r["image_id"]): (r["image"], r["boxes"]) for r in ds.iter_rows()}

    ds = build_train_dataset(out, SMALL, seed=3)
    epoch0, epoch1 = by_image(ds), by_image(ds)
    again0 = by_image(build_train_dataset(out, SMALL, seed=3))
    resumed1 = by_image(build_train_dataset(out, SMALL, seed=3, epoch=1))
    same = lambda x, y: x[0].shape == y[0].shape and np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])
    assert all(same(epoch0[i], again0[i]) for i in epoch0)        # same seed, same samples
    assert all(same(epoch1[i], resumed1[i]) for i in epoch1)      # pass 2 == a fresh dataset at epoch 1
    assert sum(not same(epoch0[i], epoch1[i]) for i in epoch0) > 12  # a new pass augments anew
