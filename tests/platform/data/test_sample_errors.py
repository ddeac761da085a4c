"""A sample that cannot be transformed: named (fail) or left out, counted and listed (skip).

The slow test trains through an augmentation plan whose flipped crop touches the right edge (where a
float mapping of the crop gives PIL a negative box offset unless the geometry clamps it) and through a
shard row whose image does not match its recorded size, with ``data.on_sample_error: skip``.
"""
from __future__ import annotations

import io
import json

import pyarrow as pa
import pytest
from PIL import Image

from dino_platform.data.streaming import _transform_batch, collate, skipped_samples
from dino_platform.data.transforms import TrainTransformConfig, sample_rng, sample_train_plan
from dino_platform.errors import DataError
from dino_platform.storage import resolve


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 160, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _table(rows) -> pa.Table:
    """Rows as the shards hold them: (image_id, file_name, recorded width, height, bytes)."""
    return pa.table({
        "image_id": pa.array([r[0] for r in rows], pa.int64()),
        "file_name": [r[1] for r in rows],
        "width": pa.array([r[2] for r in rows], pa.int32()),
        "height": pa.array([r[3] for r in rows], pa.int32()),
        "image": pa.array([r[4] for r in rows], pa.binary()),
        "boxes": pa.array([[[2.0, 2.0, 10.0, 10.0]] for _ in rows], pa.list_(pa.list_(pa.float32(), 4))),
        "category_ids": pa.array([[1] for _ in rows], pa.list_(pa.int64())),
        "iscrowd": pa.array([[0] for _ in rows], pa.list_(pa.int8())),
    })


ROWS = [(1, "good.jpg", 64, 48, _jpeg(64, 48)), (2, "moved/bad.jpg", 64, 48, _jpeg(50, 40))]
CFG = TrainTransformConfig.scaled(0.2)


def test_a_failing_training_sample_is_named_with_everything_needed_to_reproduce_it():
    with pytest.raises(DataError) as caught:
        _transform_batch(_table(ROWS), CFG, None, seed=7, epoch=3)
    message = str(caught.value)
    for part in ("image id 2", "'moved/bad.jpg'", "epoch 3", "seed 7", "GeometricPlan(",
                 "sample_rng(7, 3, 2)", "decodes to 50 x 40", "on_sample_error: skip"):
        assert part in message, (part, message)
    # the named plan is the one the call reproduces
    assert repr(sample_train_plan(64, 48, CFG, sample_rng(7, 3, 2))) in message


def test_skip_leaves_the_sample_out_and_records_it(tmp_path):
    log = resolve(str(tmp_path / "sample_errors"))
    batch = _transform_batch(_table(ROWS), CFG, None, seed=7, epoch=3, on_sample_error="skip", error_log=log)
    assert list(batch["sample_error"][:1]) == [""] and "image id 2" in batch["sample_error"][1]
    numpy_batch = dict(batch)
    images, mask, targets = collate(numpy_batch)
    assert images.shape[0] == 1 and [int(t["image_id"]) for t in targets] == [1]
    assert [i for i, _ in skipped_samples(numpy_batch)] == [2]
    (name,) = log.list_files()
    record = json.loads(log.child(name).read_bytes())
    assert record["image_id"] == 2 and record["file"] == "moved/bad.jpg" and record["epoch"] == 3


def test_evaluation_samples_fail_or_skip_the_same_way():
    with pytest.raises(DataError, match="evaluation sample: image id 2"):
        from dino_platform.data.transforms import EvalTransformConfig

        _transform_batch(_table(ROWS), None, EvalTransformConfig(96, 160), seed=0, epoch=0)


def test_predict_names_an_image_it_cannot_read_or_skips_it(tmp_path):
    import dino_core

    from dino_platform.model.detector import TorchDetector
    from dino_platform.serving.predict import predict_to_directory

    model, _, postprocessor = dino_core.build_model("dino_tiny", num_classes=5)
    detector = TorchDetector({}, {"scale": 0.2}, "test", model.eval(), postprocessor)
    images = [("ok.jpg", _jpeg(64, 48)), ("broken.jpg", b"\xff\xd8 not a picture")]
    with pytest.raises(DataError, match="broken.jpg"):
        predict_to_directory(detector, images, str(tmp_path / "a"))
    document = predict_to_directory(detector, images, str(tmp_path / "b"), on_error="skip")
    assert [i["file"] for i in document["images"]] == ["ok.jpg"]
    assert [s["file"] for s in document["skipped"]] == ["broken.jpg"]


# --- the run -----------------------------------------------------------------------------
SEED = 44  # with these 32 images, epoch 0 draws the plan that crashed PIL (asserted below)


def _right_edge_flips(images, epochs):
    """(epoch, image id) whose flipped crop touches the right edge, where a float mapping puts the
    source box's near edge below 0 (PIL: "box offset can't be negative")."""
    hits = []
    for epoch in range(epochs):
        for image in images:
            width = image["width"]
            plan = sample_train_plan(width, image["height"], CFG, sample_rng(SEED, epoch, image["id"]))
            if plan.crop is not None and plan.flip:
                left, _, crop_width, _ = plan.crop
                if width - (left + crop_width) * (width / plan.crop_resize[0]) < 0:
                    hits.append((epoch, image["id"]))
    return hits


@pytest.mark.slow
def test_training_passes_a_right_edge_flipped_crop_and_skips_a_broken_row(ray_local, tmp_path):
    """32 images x 2 epochs, the seed chosen so that a right-edge flipped crop falls in epoch 0 (about
    2 in 3,400 plans are such crops): the training path through those plans for a fraction of the CI
    time; the property sweep (test_transform_geometry) covers the plans this run does not draw.
    Measured: 1,048 s wall on the shared 2-core machine at load average 50-75 (seven engineers'
    jobs); the run itself is 8 optimizer steps, so an unloaded machine needs a small fraction of that.
    """
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    from dino_platform.data.ingest import IngestConfig, ingest
    from dino_platform.data.synth import SynthConfig, generate
    from dino_platform.train.config import load_config
    from dino_platform.train.trainer import run_training

    raw = tmp_path / "raw"
    generate(SynthConfig(kind="coco", images=32, seed=1, size=(160, 120)), str(raw))
    ingest(IngestConfig(format="coco", annotations_uri=str(raw / "annotations.json"), images_uri=str(raw / "images"),
                        out_uri=str(tmp_path / "shards"), parallel=False))
    images = json.loads((raw / "annotations.json").read_text())["images"]
    hits = _right_edge_flips(images, epochs=2)
    assert hits and hits[0][0] == 0, hits

    # a row whose picture no longer has its recorded size (e.g. replaced after ingest)
    manifest_path = tmp_path / "shards" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    shard = manifest["shards"][0]
    table = pq.read_table(tmp_path / "shards" / shard["name"])
    broken_id = next(i for i in table.column("image_id").to_pylist() if i != hits[0][1])
    pictures = [(_jpeg(40, 30) if i == broken_id else data)
                for i, data in zip(table.column("image_id").to_pylist(), table.column("image").to_pylist())]
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(pictures, pa.binary()))
    pq.write_table(table, tmp_path / "shards" / shard["name"])
    shard["bytes"] = (tmp_path / "shards" / shard["name"]).stat().st_size
    manifest_path.write_text(json.dumps(manifest))

    cfg = load_config({
        "data": {"train_uri": str(tmp_path / "shards"), "transform": {"scale": 0.2}, "on_sample_error": "skip"},
        "model": {"preset": "dino_tiny", "num_classes": 91},
        "optim": {"epochs": 2, "lr": 2e-4},
        "scaling": {"num_workers": 2, "batch_size_per_worker": 4},
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "checkpoint": {"every_n_epochs": 2},
        "run": {"name": "right-edge-flips", "storage_path": str(tmp_path / "runs"), "seed": SEED},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    })
    outcome = run_training(cfg)
    assert outcome.error is None and outcome.metrics["step"] == 2 * 4
    client = MlflowClient(outcome.tracking.tracking_uri)
    run = client.get_run(outcome.tracking.run_id)
    assert run.data.metrics["data/skipped_samples"] == 2  # the broken row, once per epoch
    artifact = client.download_artifacts(run.info.run_id, "sample_errors.json", str(tmp_path / "dl"))
    skipped = json.loads(open(artifact).read())["skipped"]
    assert sorted((r["epoch"], r["image_id"]) for r in skipped) == [(0, broken_id), (1, broken_id)]
