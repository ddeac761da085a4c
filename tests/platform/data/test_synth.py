"""Synthetic datasets: deterministic, COCO-style, real label spaces, a class set shared by both."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from dino_platform.cli import main
from dino_platform.data.categories import coco_categories, o365_to_coco_names, objects365_categories
from dino_platform.data.synth import SYNTH_CLASSES, SynthConfig, category_ids, generate
from dino_platform.errors import ConfigError
from dino_platform.storage import resolve


def _files(root) -> dict:
    location = resolve(str(root))
    return {name: location.child(name).read_bytes() for name in location.list_files()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    cfg = SynthConfig(kind="coco", images=6, seed=7, size=(160, 120))
    generate(cfg, str(tmp_path / "a"))
    generate(cfg, str(tmp_path / "b"))
    generate(SynthConfig(kind="coco", images=6, seed=8, size=(160, 120)), str(tmp_path / "c"))
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b and len(a) == 7
    assert a["annotations.json"] != c["annotations.json"]


def test_coco_kind_schema(tmp_path):
    counts = generate(SynthConfig(kind="coco", images=40, seed=1, size=(160, 120)), str(tmp_path))
    doc = json.loads((tmp_path / "annotations.json").read_text())
    assert counts == {"images": 40, "annotations": len(doc["annotations"])}
    ids = {c["id"]: c["name"] for c in doc["categories"]}
    assert ids == coco_categories() and len(ids) == 80 and max(ids) == 90 and 12 not in ids
    image_ids = [im["id"] for im in doc["images"]]
    assert len(set(image_ids)) == 40 and image_ids != list(range(1, 41))  # sparse, like COCO
    drawn = set(category_ids("coco").values())
    by_image = {im["id"]: im for im in doc["images"]}
    for ann in doc["annotations"]:
        assert ann["category_id"] in drawn
        x, y, w, h = ann["bbox"]
        image = by_image[ann["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= image["width"] and y + h <= image["height"]
        assert 0 < ann["area"] <= w * h
    crowd = [a for a in doc["annotations"] if a["iscrowd"]]
    assert crowd and all(set(a["segmentation"]) == {"counts", "size"} for a in crowd)
    assert all(isinstance(a["segmentation"], list) for a in doc["annotations"] if not a["iscrowd"])
    for image in doc["images"][:5]:
        picture = Image.open(io.BytesIO((tmp_path / "images" / image["file_name"]).read_bytes()))
        assert picture.format == "JPEG" and picture.size == (image["width"], image["height"])


def test_o365_kind_layout_and_fields(tmp_path):
    generate(SynthConfig(kind="o365", images=60, seed=2, size=(160, 120)), str(tmp_path))
    doc = json.loads((tmp_path / "annotations.json").read_text())
    assert {c["id"]: c["name"] for c in doc["categories"]} == objects365_categories()
    assert len(doc["categories"]) == 365 and doc["categories"][0]["name"] == "Person"
    patches = set()
    for image in doc["images"]:
        assert image["file_name"].startswith("images/v2/patch")
        on_disk = image["file_name"].removeprefix("images/v2/")
        assert (tmp_path / "images" / on_disk).is_file()
        patches.add(on_disk.split("/")[0])
    assert patches == {"patch0", "patch1"}
    assert all(a["isfake"] == 0 and a["isreflected"] == 0 and "segmentation" not in a for a in doc["annotations"])


def test_drawn_classes_correspond_across_label_spaces():
    o365, coco = objects365_categories(), coco_categories()
    o365_ids, coco_ids = category_ids("o365"), category_ids("coco")
    assert len(SYNTH_CLASSES) == 8
    for name in SYNTH_CLASSES:
        assert coco[coco_ids[name]] == name
        assert o365_to_coco_names()[o365[o365_ids[name]]] == name
    assert o365[o365_ids["person"]] == "Person" and o365[o365_ids["stop sign"]] == "Stop Sign"


def test_bad_config_names_field():
    with pytest.raises(ConfigError, match="kind"):
        SynthConfig(kind="voc")
    with pytest.raises(ConfigError, match="size"):
        SynthConfig(size=(10, 10))


def test_cli_synth(tmp_path, capsys):
    assert main(["synth", "--kind", "o365", "--out", str(tmp_path), "--images", "3", "--size", "96", "80"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["images"] == 3 and (tmp_path / "annotations.json").is_file()
