"""Ingest: quirks accepted, bad input quarantined with its reason, resumable, local and S3."""
from __future__ import annotations

import io
import json
import shutil
from collections import Counter

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dino_platform.cli import main
from dino_platform.data.ingest import IngestConfig, Reason, ingest
from dino_platform.data.manifest import read_ground_truth, read_manifest, verify_shards
from dino_platform.data.synth import SynthConfig, generate
from dino_platform.errors import DataError, StorageError
from dino_platform.storage import Location, resolve


_WRITE_BYTES = Location.write_bytes


def _rows(out_uri: str) -> list:
    manifest = read_manifest(out_uri)
    rows = []
    for shard in manifest.shards:
        rows += pq.read_table(io.BytesIO(resolve(out_uri).child(shard.name).read_bytes())).to_pylist()
    return rows


@pytest.fixture(scope="module")
def clean_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean_coco")
    generate(SynthConfig(kind="coco", images=14, seed=3, size=(160, 120)), str(root))
    return root


def _broken_copy(clean, dest):
    """The clean dataset with one of each bad input (and each COCO quirk) added.

    Returns (expected reasons -> count, expected image ids in the shards, expected annotation count).
    """
    shutil.copytree(clean, dest)
    doc = json.loads((dest / "annotations.json").read_text())
    images, anns = doc["images"], doc["annotations"]
    by_id = {im["id"]: im for im in images}
    per_image = Counter(a["image_id"] for a in anns)
    annotated = [im for im in images if per_image[im["id"]] >= 1]
    corrupt, truncated, missing, resized, host = annotated[:5]
    (dest / "images" / corrupt["file_name"]).write_bytes(b"\x00not a jpeg\xff" * 50)
    data = (dest / "images" / truncated["file_name"]).read_bytes()
    (dest / "images" / truncated["file_name"]).write_bytes(data[: len(data) // 2])
    (dest / "images" / missing["file_name"]).unlink()
    resized["width"] += 1  # the file says otherwise
    lost = {corrupt["id"], truncated["id"], missing["id"], resized["id"]}
    dropped_with_images = sum(per_image[i] for i in lost)

    next_id = max(a["id"] for a in anns) + 1
    w, h = host["width"], host["height"]

    def add(**fields):
        nonlocal next_id
        ann = {"id": next_id, "image_id": host["id"], "category_id": 1, "bbox": [10.25, 10.5, 20.75, 15.5],
               "area": 100.0, "iscrowd": 0, "segmentation": [[10, 10, 30, 10, 30, 25]]}
        ann.update(fields)
        anns.append(ann)
        next_id += 1
        return ann

    add(category_id=999)                                   # unknown category
    add(image_id=987654321)                                # unknown image
    add(bbox=[5.0, 5.0, 0.0, 10.0])                        # zero width
    add(bbox=[w + 10.0, 5.0, 20.0, 20.0])                  # entirely outside
    add(bbox=[w - 10.0, h - 5.0, 30.0, 30.0])              # partly outside: clipped, kept
    add(id=anns[0]["id"])                                  # duplicate annotation id
    add(iscrowd=1, segmentation={"counts": [5, 10, 100], "size": [h, w]})  # crowd with RLE: kept
    add(bbox=[1.5, 2.25, 3.125, 4.0625])                   # float box, polygon segmentation: kept
    images.append(dict(host, file_name="duplicate.jpg"))   # duplicate image id
    shutil.copy(dest / "images" / host["file_name"], dest / "images" / "lonely.jpg")
    images.append({"id": 424242, "file_name": "lonely.jpg", "width": w, "height": h})  # no annotations
    (dest / "annotations.json").write_text(json.dumps(doc))

    reasons = {Reason.CORRUPT_IMAGE: 1, Reason.TRUNCATED_IMAGE: 1, Reason.MISSING_IMAGE: 1,
               Reason.IMAGE_SIZE_MISMATCH: 1, Reason.UNKNOWN_CATEGORY_ID: 1, Reason.UNKNOWN_IMAGE_ID: 1,
               Reason.NON_POSITIVE_BOX: 1, Reason.BOX_OUTSIDE_IMAGE: 1, Reason.DUPLICATE_ANNOTATION_ID: 1,
               Reason.DUPLICATE_IMAGE_ID: 1}
    good_ids = (set(by_id) - lost) | {424242}
    good_annotations = len(doc["annotations"]) - 5 - dropped_with_images  # 5 bad ones added
    return reasons, good_ids, good_annotations, host


def _check_broken_result(out_uri, reasons, good_ids, good_annotations, host):
    manifest = verify_shards(out_uri, deep=True)
    assert Counter(q["reason"] for q in manifest.quarantined) == reasons
    assert manifest.stats["quarantined_by_reason"] == reasons
    for entry in manifest.quarantined:
        assert ("file" in entry or "image_id" in entry) and entry["detail"]
    rows = _rows(out_uri)
    assert {r["image_id"] for r in rows} == good_ids and manifest.images == len(good_ids)
    assert sum(len(r["annotation_ids"]) for r in rows) == good_annotations == manifest.annotations
    assert manifest.stats["clipped_boxes"] == 1
    host_row = next(r for r in rows if r["image_id"] == host["id"])
    boxes = [list(b) for b in host_row["boxes"]]
    w, h = host["width"], host["height"]
    assert [w - 10.0, h - 5.0, 10.0, 5.0] in boxes                # clipped to the image
    assert [1.5, 2.25, 3.125, 4.0625] in boxes                    # float box kept exactly
    assert 1 in host_row["iscrowd"]
    assert next(r for r in rows if r["image_id"] == 424242)["annotation_ids"] == []
    assert manifest.categories[90] == "toothbrush" and 12 not in manifest.categories
    gt = read_ground_truth(out_uri)
    assert len(gt["images"]) == len(good_ids) and len(gt["annotations"]) == good_annotations


def test_broken_dataset_local(clean_coco, tmp_path):
    expected = _broken_copy(clean_coco, tmp_path / "src")
    manifest = ingest(IngestConfig("coco", str(tmp_path / "src/annotations.json"), str(tmp_path / "src/images"),
                                   str(tmp_path / "out"), shard_size=4, parallel=False))
    # 15 image records - 1 duplicate - 1 missing file = 13 planned, 4 per shard; bad files leave gaps
    assert len(manifest.shards) == 4 and sum(s.rows for s in manifest.shards) == 11
    _check_broken_result(str(tmp_path / "out"), *expected)
    assert not (tmp_path / "out" / "_ingest").exists()


def _upload(local_dir, uri):
    source, target = resolve(str(local_dir)), resolve(uri)
    for name in source.list_files():
        target.child(name).write_bytes(source.child(name).read_bytes())


def test_broken_dataset_from_and_to_s3(clean_coco, tmp_path, s3_bucket):
    expected = _broken_copy(clean_coco, tmp_path / "src")
    _upload(tmp_path / "src", f"{s3_bucket}/raw")
    out = f"{s3_bucket}/shards/coco"
    ingest(IngestConfig("coco", f"{s3_bucket}/raw/annotations.json", f"{s3_bucket}/raw/images", out,
                        shard_size=4, parallel=False))
    _check_broken_result(out, *expected)
    assert not any(name.startswith("_ingest") for name in resolve(out).list_files())


def _record_shard_writes(monkeypatch, writes: list, crash_after=None) -> None:
    """Append the name of each shard file written to ``writes``; with ``crash_after``, the write after
    that many raises KeyboardInterrupt (a crash between two shards)."""
    def write(location, payload):
        if location.name.startswith("shard-") and location.name.endswith(".parquet"):
            if len(writes) == crash_after:
                raise KeyboardInterrupt("simulated crash")
            writes.append(location.name)
        _WRITE_BYTES(location, payload)

    monkeypatch.setattr(Location, "write_bytes", write)


def test_interrupted_ingest_resumes_to_identical_shards(clean_coco, tmp_path, monkeypatch):
    args = dict(annotations_uri=str(clean_coco / "annotations.json"), images_uri=str(clean_coco / "images"),
                shard_size=3, parallel=False)
    reference = ingest(IngestConfig("coco", out_uri=str(tmp_path / "reference"), **args))
    assert len(reference.shards) == 5

    writes = []
    _record_shard_writes(monkeypatch, writes, crash_after=2)
    with pytest.raises(KeyboardInterrupt):
        ingest(IngestConfig("coco", out_uri=str(tmp_path / "out"), **args))
    with pytest.raises(DataError, match="no manifest"):
        read_manifest(str(tmp_path / "out"))

    writes.clear()
    _record_shard_writes(monkeypatch, writes)
    resumed = ingest(IngestConfig("coco", out_uri=str(tmp_path / "out"), **args))
    assert writes == ["shard-00002.parquet", "shard-00003.parquet", "shard-00004.parquet"]  # first two kept
    assert resumed.digest == reference.digest and resumed.shards == reference.shards
    for shard in reference.shards:
        assert (tmp_path / "out" / shard.name).read_bytes() == (tmp_path / "reference" / shard.name).read_bytes()

    writes.clear()
    again = ingest(IngestConfig("coco", out_uri=str(tmp_path / "out"), **args))
    assert writes == [] and again.digest == reference.digest  # finished and unchanged: nothing to do


def test_fewer_shards_on_reingest_removes_stale_ones(clean_coco, tmp_path):
    args = dict(annotations_uri=str(clean_coco / "annotations.json"), images_uri=str(clean_coco / "images"),
                out_uri=str(tmp_path / "out"), parallel=False)
    ingest(IngestConfig("coco", shard_size=2, **args))
    manifest = ingest(IngestConfig("coco", shard_size=10, **args))
    assert sorted(p.name for p in (tmp_path / "out").glob("shard-*")) == [s.name for s in manifest.shards]
    verify_shards(str(tmp_path / "out"), deep=True)


def test_tampered_shard_is_detected(clean_coco, tmp_path):
    out = tmp_path / "out"
    ingest(IngestConfig("coco", str(clean_coco / "annotations.json"), str(clean_coco / "images"), str(out),
                        shard_size=8, parallel=False))
    shard = out / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    verify_shards(str(out))  # same size: only the deep check sees it
    with pytest.raises(DataError, match="shard-00001.parquet content differs"):
        verify_shards(str(out), deep=True)
    shard.unlink()
    with pytest.raises(DataError, match="shard-00001.parquet is missing"):
        verify_shards(str(out))


def test_objects365_patch_layout(tmp_path):
    generate(SynthConfig(kind="o365", images=55, seed=4, size=(96, 80)), str(tmp_path / "src"))
    doc = json.loads((tmp_path / "src/annotations.json").read_text())
    manifest = ingest(IngestConfig("o365", str(tmp_path / "src/annotations.json"), str(tmp_path / "src/images"),
                                   str(tmp_path / "out"), shard_size=20, parallel=False))
    assert manifest.quarantined == [] and manifest.images == 55 and manifest.annotations == len(doc["annotations"])
    assert len(manifest.categories) == 365 and manifest.format == "o365"
    rows = _rows(str(tmp_path / "out"))
    assert rows[0]["file_name"] == "images/v2/patch0/objects365_v2_00000001.jpg"
    assert rows[-1]["file_name"] == "images/v2/patch1/objects365_v2_00000055.jpg"


def test_image_paths_are_found_with_leading_components_stripped(tmp_path):
    stored = ["patch8/objects365_v1_00420917.jpg", "000000000139.jpg", "val/a.jpg"]
    for k, name in enumerate(stored):
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16 + k, 12), (40 * k, 90, 200)).save(tmp_path / "images" / name, format="JPEG")
    named = ["images/v1/patch8/objects365_v1_00420917.jpg", "000000000139.jpg", "val/a.jpg",
             "patch9/objects365_v1_00420917.jpg"]
    images = [{"id": k + 1, "file_name": name, "width": 16 + k, "height": 12} for k, name in enumerate(named)]
    (tmp_path / "annotations.json").write_text(json.dumps({"images": images, "categories": [
        {"id": 1, "name": "thing"}], "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}]}))
    manifest = ingest(IngestConfig("coco", str(tmp_path / "annotations.json"), str(tmp_path / "images"),
                                   str(tmp_path / "out"), parallel=False))
    found = {row["file_name"]: row["image"] for row in _rows(str(tmp_path / "out"))}
    assert found[named[0]] == (tmp_path / "images" / "patch8/objects365_v1_00420917.jpg").read_bytes()
    assert found[named[1]] == (tmp_path / "images" / "000000000139.jpg").read_bytes()
    assert found[named[2]] == (tmp_path / "images" / "val/a.jpg").read_bytes()
    assert named[3] not in found
    assert [(q["file"], q["reason"]) for q in manifest.quarantined] == [(named[3], Reason.MISSING_IMAGE)]


def test_malformed_json_names_the_file(tmp_path):
    bad = tmp_path / "instances.json"
    bad.write_text('{"images": [], "annotations": [}')
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"instances.json: malformed JSON at line 1 column 32"):
        ingest(IngestConfig("coco", str(bad), str(tmp_path / "images"), str(tmp_path / "out"), parallel=False))
    bad.write_text('{"images": []}')
    with pytest.raises(DataError, match="instances.json: field 'annotations' is missing"):
        ingest(IngestConfig("coco", str(bad), str(tmp_path / "images"), str(tmp_path / "out"), parallel=False))


def test_missing_inputs_are_clear_errors(clean_coco, tmp_path, capsys):
    with pytest.raises(StorageError, match="nope.json: does not exist"):
        ingest(IngestConfig("coco", str(tmp_path / "nope.json"), str(clean_coco / "images"), str(tmp_path / "o")))
    with pytest.raises(DataError, match="none of its 14 images was found under .*wrong; check --images"):
        ingest(IngestConfig("coco", str(clean_coco / "annotations.json"), str(tmp_path / "wrong"),
                            str(tmp_path / "o"), parallel=False))
    code = main(["ingest", "--format", "coco", "--annotations", str(tmp_path / "nope.json"),
                 "--images", str(clean_coco / "images"), "--out", str(tmp_path / "o"), "--no-ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("dino ingest: error:") and "nope.json" in err[-1]


def test_cli_ingest(clean_coco, tmp_path, capsys):
    code = main(["ingest", "--format", "coco", "--annotations", str(clean_coco / "annotations.json"),
                 "--images", str(clean_coco / "images"), "--out", str(tmp_path / "o"), "--no-ray",
                 "--shard-size", "5"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["images"] == 14 and summary["shards"] == 3 and summary["quarantined"] == 0
