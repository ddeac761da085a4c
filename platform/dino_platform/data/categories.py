"""The label spaces the platform knows: Objects365 (v2, ids 1..365) and COCO (80 names, ids 1..90).

The lists are package data under ``dino_platform/resources/``; ``o365_to_coco.json`` maps each
COCO class to the one Objects365 class it corresponds to (by name), for class transfer.
"""
from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Dict


@functools.lru_cache(maxsize=None)
def _load(name: str):
    return json.loads(resources.files("dino_platform").joinpath("resources", name).read_text("utf-8"))


def objects365_categories() -> Dict[int, str]:
    """Objects365 v2 category id -> name, exactly as the dataset spells them (typos included)."""
    return {int(c["id"]): c["name"] for c in _load("objects365_categories.json")}


def coco_categories() -> Dict[int, str]:
    """COCO category id (1..90, 80 of them used) -> name."""
    return {int(c["id"]): c["name"] for c in _load("coco_categories.json")}


def o365_to_coco_names() -> Dict[str, str]:
    """Objects365 category name -> COCO category name, one-to-one, for the 80 classes COCO has."""
    return dict(_load("o365_to_coco.json"))


def o365_to_coco_ids() -> Dict[int, int]:
    """Objects365 category id -> COCO category id for the corresponding classes."""
    o365_ids = {name: cid for cid, name in objects365_categories().items()}
    coco_ids = {name: cid for cid, name in coco_categories().items()}
    return {o365_ids[o]: coco_ids[c] for o, c in o365_to_coco_names().items()}
