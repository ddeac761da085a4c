"""The streaming ingest writes, byte for byte, what the in-memory ingest wrote on the same inputs.

The reference outputs (``fixtures/ingest_reference.json``) were written by the ingest that parsed
the whole JSON with ``json.loads`` (commit e41e98d); ``tests/support/ingest_reference.py`` regenerates them.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from dino_platform.data import ingest as ingest_module
from dino_platform.data.ingest import IngestConfig, ingest
from dino_platform.data.manifest import SHARD_FORMAT_VERSION, read_manifest
from dino_platform.errors import DataError
from dino_platform.storage import resolve
from support.ingest_reference import CASES, FIXTURE, output_digests, run_case

REFERENCE = json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return tmp_path_factory.mktemp("parity")


@pytest.mark.parametrize("case", sorted(REFERENCE))
def test_same_shards_manifest_and_digest_as_the_in_memory_ingest(case, sources):
    name, size = case.split("/")
    result = run_case(name, sources, ingest, IngestConfig, int(size))
    expected = REFERENCE[case]
    assert result["inputs"] == expected["inputs"], (
        "the synthetic inputs differ from those the reference was made from (another Pillow or "
        "numpy?): regenerate the fixture as tests/support/ingest_reference.py says")
    assert result["outputs"] == expected["outputs"]
    assert result["digest"] == expected["digest"]
    # the plan digest: sha256 over the annotation file's bytes, then the shaping settings
    source = sources / name
    fmt = CASES[name][1]
    hasher = hashlib.sha256((source / "annotations.json").read_bytes())
    hasher.update(json.dumps([fmt, int(size), str(source / "images"), SHARD_FORMAT_VERSION]).encode())
    assert result["plan_digest"] == hasher.hexdigest()


def test_small_chunks_and_column_chunks_change_nothing(sources, monkeypatch):
    """Records cut across reads and column chunks (7-byte reads, 3 records per chunk)."""
    monkeypatch.setattr(ingest_module, "READ_CHUNK", 7)
    monkeypatch.setattr(ingest_module, "COLUMN_CHUNK", 3)
    result = run_case("broken_coco", sources, ingest, IngestConfig, 4)
    assert result["outputs"] == REFERENCE["broken_coco/4"]["outputs"]


@pytest.mark.slow
def test_s3_source_and_ray_tasks_write_the_same_shards(sources, tmp_path, s3_bucket, ray_local):
    """Streamed from S3, listed per folder, shards built by Ray tasks from object references.

    Measured: 16 s for the test itself, plus the session's Ray start (2-core machine under load)."""
    run_case("objects365", sources, ingest, IngestConfig, 20)  # builds the source once
    local, remote = resolve(str(sources / "objects365")), resolve(f"{s3_bucket}/raw")
    for name in local.list_files():
        remote.child(name).write_bytes(local.child(name).read_bytes())
    out = tmp_path / "out"
    manifest = ingest(IngestConfig("o365", f"{s3_bucket}/raw/annotations.json", f"{s3_bucket}/raw/images",
                                   str(out), shard_size=20, parallel=True))
    expected = REFERENCE["objects365/20"]
    outputs = output_digests(out, tmp_path)
    outputs.pop("manifest.json")  # it names the S3 source instead of the local one
    assert outputs == {k: v for k, v in expected["outputs"].items() if k != "manifest.json"}
    assert manifest.digest == expected["digest"] and read_manifest(str(out)).digest == expected["digest"]
    shutil.rmtree(out)


def test_one_parser_serves_every_section():
    """ijson 3.6.0 compares paths with ``==``: one C pass builds the records of all three sections
    (else the ingest falls back to a pass per section, three times the parsing)."""
    assert ingest_module._one_parser_works()


def test_parallel_listing_equals_one_recursive_listing(sources, s3_bucket):
    run_case("objects365", sources, ingest, IngestConfig, 20)
    local = resolve(str(sources / "objects365" / "images"))
    top = sources / "objects365" / "images" / "top.jpg"  # a file beside the folders
    top.write_bytes(b"x")
    try:
        remote = resolve(f"{s3_bucket}/images")
        for name in local.list_files():
            remote.child(name).write_bytes(local.child(name).read_bytes())
        assert local.subdirectories() == ["patch0", "patch1"] == remote.subdirectories()
        for location in (local, remote):
            listed = ingest_module.list_images(location)
            assert listed == set(location.list_files()) and "top.jpg" in listed and len(listed) == 56
    finally:
        top.unlink()


def test_top_level_layout_errors_name_the_field(tmp_path):
    (tmp_path / "images").mkdir()
    bad = tmp_path / "a.json"
    for text, message in [('[1, 2]', "expected a COCO-style JSON object, got list"),
                          ('{"images": [], "annotations": {}, "categories": []}', "field 'annotations' is missing"),
                          ('{"images": [{"id": 1}], "annotations": []}', "field 'categories' is missing"),
                          ('{"images": [], "annotations": [], "categories": [1], "images": 3}', "field 'images'")]:
        bad.write_text(text)
        with pytest.raises(DataError, match=message):
            ingest(IngestConfig("coco", str(bad), str(tmp_path / "images"), str(tmp_path / "out"), parallel=False))


def test_non_strict_json_is_refused_with_the_reason(tmp_path):
    (tmp_path / "images").mkdir()
    bad = tmp_path / "a.json"
    bad.write_text('{"images": [], "annotations": [{"id": 1, "bbox": [NaN, 1, 2, 3]}], "categories": []}')
    with pytest.raises(DataError, match="a.json: not strict JSON .*NaN"):
        ingest(IngestConfig("coco", str(bad), str(tmp_path / "images"), str(tmp_path / "out"), parallel=False))

