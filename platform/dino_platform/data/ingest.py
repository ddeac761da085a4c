"""COCO / Objects365 annotations + images -> Parquet shards and ``manifest.json``.

The driver reads and checks the annotation JSON (ids, categories, boxes), lists the image store
once to map file names onto files, and cuts the surviving images, sorted by id, into shards of
``shard_size``. Each shard is then built by one task (Ray tasks over the cores, or in-process):
read every image, decode it fully to prove it is sound, write the shard, and record it as done.
The manifest is written last, after stale shards are removed: a shard directory without a
manifest is unfinished.

Bad input never stops the run and is never silent: each rejected item goes to
``manifest.quarantined`` with a :class:`Reason` code. Malformed JSON or an unreachable store is a
clear error naming the file.

Re-running after an interruption with the same inputs ends with byte-identical shards: shard
content depends only on the inputs, and shards recorded as done under ``_ingest/`` are kept.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Literal, Optional, Tuple

from PIL import Image, UnidentifiedImageError

from dino_platform.data.manifest import (
    MANIFEST_NAME, SHARD_FORMAT_VERSION, Manifest, ShardInfo, content_digest, encode_shard,
    read_manifest, shard_name, verify_shards,
)
from dino_platform.errors import ConfigError, DataError
from dino_platform.storage import Location, StorageNotFoundError, resolve

log = logging.getLogger(__name__)

IngestFormat = Literal["coco", "o365"]
WORK_DIR = "_ingest"  # progress markers of an unfinished ingest, removed when it commits


class Reason:
    """Quarantine reason codes (``manifest.quarantined[i]["reason"]``)."""

    MALFORMED_CATEGORY = "malformed_category"
    DUPLICATE_CATEGORY_ID = "duplicate_category_id"
    MALFORMED_IMAGE_RECORD = "malformed_image_record"
    DUPLICATE_IMAGE_ID = "duplicate_image_id"
    MISSING_IMAGE = "missing_image"
    CORRUPT_IMAGE = "corrupt_image"
    TRUNCATED_IMAGE = "truncated_image"
    IMAGE_SIZE_MISMATCH = "image_size_mismatch"
    MALFORMED_ANNOTATION = "malformed_annotation"
    DUPLICATE_ANNOTATION_ID = "duplicate_annotation_id"
    UNKNOWN_IMAGE_ID = "unknown_image_id"
    UNKNOWN_CATEGORY_ID = "unknown_category_id"
    NON_POSITIVE_BOX = "non_positive_box"
    BOX_OUTSIDE_IMAGE = "box_outside_image"


@dataclass(frozen=True)
class IngestConfig:
    format: IngestFormat
    annotations_uri: str
    images_uri: str
    out_uri: str
    shard_size: int = 512
    parallel: bool = True  # Ray tasks over the cluster's CPUs; False: one after another, here

    def __post_init__(self) -> None:
        if self.format not in ("coco", "o365"):
            raise ConfigError(f"format: {self.format!r} is not one of 'coco', 'o365'")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size: must be >= 1, got {self.shard_size}")


@dataclass
class ImageEntry:
    """One image bound for a shard: its record, resolved file and checked annotations."""

    image_id: int
    file_name: str
    relative_path: str  # under the images location
    width: int
    height: int
    annotation_ids: List[int] = field(default_factory=list)
    boxes: List[List[float]] = field(default_factory=list)
    category_ids: List[int] = field(default_factory=list)
    iscrowd: List[int] = field(default_factory=list)
    areas: List[float] = field(default_factory=list)


@dataclass
class ShardResult:
    info: ShardInfo
    quarantined: List[Dict[str, Any]]
    dropped_annotations: int  # annotations that left with a quarantined image


# --- checking the annotation JSON (driver) -------------------------------------------------------
def load_annotations(location: Location) -> Tuple[dict, bytes]:
    data = location.read_bytes()
    try:
        document = json.loads(data)
    except json.JSONDecodeError as exc:
        raise DataError(f"{location.uri}: malformed JSON at line {exc.lineno} column {exc.colno}: "
                        f"{exc.msg}; fix or re-download the annotation file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{location.uri}: not UTF-8 JSON ({exc.reason}); is this the annotation file?") from None
    if not isinstance(document, dict):
        raise DataError(f"{location.uri}: expected a COCO-style JSON object, got {type(document).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(document.get(key), list):
            raise DataError(f"{location.uri}: field {key!r} is missing or not a list; "
                            "expected COCO-style JSON with images, annotations and categories")
    return document, data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_categories(records: Iterable[Any], quarantine: List[dict]) -> Dict[int, str]:
    categories: Dict[int, str] = {}
    for record in records:
        if not isinstance(record, dict) or not _is_int(record.get("id")) or not isinstance(record.get("name"), str):
            quarantine.append({"category": repr(record)[:200], "reason": Reason.MALFORMED_CATEGORY,
                               "detail": "a category needs an integer id and a string name"})
        elif record["id"] in categories:
            quarantine.append({"category_id": record["id"], "reason": Reason.DUPLICATE_CATEGORY_ID,
                               "detail": f"id {record['id']} is used again by {record['name']!r}; kept "
                                         f"{categories[record['id']]!r}"})
        else:
            categories[record["id"]] = record["name"]
    return categories


def resolve_image_path(file_name: str, available: set) -> Optional[str]:
    """Where ``file_name`` lies under the images location: the path itself, or the path with its
    leading components stripped one by one (Objects365's JSON says ``images/v1/patch8/x.jpg`` for
    a file stored as ``patch8/x.jpg``)."""
    parts = [p for p in file_name.replace("\\", "/").split("/") if p not in ("", ".")]
    for start in range(len(parts)):
        candidate = "/".join(parts[start:])
        if candidate in available:
            return candidate
    return None


def check_images(records: Iterable[Any], available: set, images_uri: str,
                 quarantine: List[dict]) -> Dict[int, ImageEntry]:
    entries: Dict[int, ImageEntry] = {}
    for record in records:
        if not isinstance(record, dict) or not _is_int(record.get("id")) \
                or not isinstance(record.get("file_name"), str) \
                or not all(_is_int(record.get(k)) and record[k] > 0 for k in ("width", "height")):
            quarantine.append({"image": repr(record)[:200], "reason": Reason.MALFORMED_IMAGE_RECORD,
                               "detail": "an image needs an integer id, a file_name and positive "
                                         "integer width and height"})
            continue
        image_id, file_name = record["id"], record["file_name"]
        if image_id in entries:
            quarantine.append({"image_id": image_id, "file": file_name, "reason": Reason.DUPLICATE_IMAGE_ID,
                               "detail": f"image id {image_id} already names {entries[image_id].file_name}; "
                                         "kept the first"})
            continue
        relative = resolve_image_path(file_name, available)
        if relative is None:
            quarantine.append({"image_id": image_id, "file": file_name, "reason": Reason.MISSING_IMAGE,
                               "detail": f"not found under {images_uri}"})
            # remembered without a file so its annotations are dropped with it, not "unknown"
            entries[image_id] = ImageEntry(image_id, file_name, "", 0, 0)
            continue
        entries[image_id] = ImageEntry(image_id, file_name, relative, record["width"], record["height"])
    return entries


def check_annotations(records: Iterable[Any], images: Dict[int, ImageEntry], categories: Dict[int, str],
                      quarantine: List[dict], stats: Counter) -> None:
    """Attach each sound annotation to its image (boxes clipped to the image), quarantine the rest."""
    seen_ids = set()
    for record in records:
        if not isinstance(record, dict) or not _is_int(record.get("id")) or not _is_int(record.get("image_id")) \
                or not _is_int(record.get("category_id")):
            quarantine.append({"annotation": repr(record)[:200], "reason": Reason.MALFORMED_ANNOTATION,
                               "detail": "an annotation needs integer id, image_id and category_id"})
            continue
        ann_id, image_id, category_id = record["id"], record["image_id"], record["category_id"]
        where = {"annotation_id": ann_id, "image_id": image_id}
        if ann_id in seen_ids:
            quarantine.append({**where, "reason": Reason.DUPLICATE_ANNOTATION_ID,
                               "detail": f"annotation id {ann_id} appears more than once; kept the first"})
            continue
        seen_ids.add(ann_id)
        image = images.get(image_id)
        if image is None:
            quarantine.append({**where, "reason": Reason.UNKNOWN_IMAGE_ID,
                               "detail": f"no image has id {image_id}"})
            continue
        if category_id not in categories:
            quarantine.append({**where, "reason": Reason.UNKNOWN_CATEGORY_ID,
                               "detail": f"category id {category_id} is not among the categories"})
            continue
        bbox = record.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            quarantine.append({**where, "reason": Reason.MALFORMED_ANNOTATION,
                               "detail": f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r:.80}"})
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            quarantine.append({**where, "reason": Reason.NON_POSITIVE_BOX,
                               "detail": f"bbox {list(bbox)} has width or height <= 0"})
            continue
        if not image.relative_path:  # its image is missing: leaves with it
            stats["annotations_dropped_with_images"] += 1
            continue
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(image.width)), min(y + h, float(image.height))
        if x1 <= x0 or y1 <= y0:
            quarantine.append({**where, "reason": Reason.BOX_OUTSIDE_IMAGE,
                               "detail": f"bbox {list(bbox)} lies outside the {image.width}x{image.height} image"})
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            stats["clipped_boxes"] += 1
        crowd = record.get("iscrowd", 0)
        area = record.get("area")
        image.annotation_ids.append(ann_id)
        image.boxes.append([x0, y0, x1 - x0, y1 - y0])
        image.category_ids.append(category_id)
        image.iscrowd.append(1 if crowd in (1, True) else 0)
        image.areas.append(float(area) if _is_number(area) and area >= 0 else (x1 - x0) * (y1 - y0))


# --- building one shard (task) ---------------------------------------------------------------------
def _check_image_bytes(data: bytes, entry: ImageEntry) -> Optional[Tuple[str, str]]:
    """None if ``data`` decodes completely at the recorded size, else (reason, detail)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about EXIF oddities that are not errors
            with Image.open(io.BytesIO(data)) as picture:
                size = picture.size
                if picture.format == "JPEG":  # a reduced-size decode still reads every byte
                    picture.draft(picture.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
                picture.load()
    except UnidentifiedImageError:
        return Reason.CORRUPT_IMAGE, "not a decodable image"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if "truncated" in str(exc).lower():
            return Reason.TRUNCATED_IMAGE, str(exc)
        return Reason.CORRUPT_IMAGE, str(exc)
    if size != (entry.width, entry.height):
        return Reason.IMAGE_SIZE_MISMATCH, f"file is {size[0]}x{size[1]}, annotations say {entry.width}x{entry.height}"
    return None


def build_shard(index: int, entries: List[ImageEntry], images: Location, out: Location) -> ShardResult:
    """Read, check and write shard ``index``; record it under ``_ingest/`` as done."""
    rows, quarantined, dropped = [], [], 0
    for entry in entries:
        try:
            data = images.child(entry.relative_path).read_bytes()
        except StorageNotFoundError:  # listed, then gone
            problem = (Reason.MISSING_IMAGE, f"{images.uri}/{entry.relative_path} disappeared during ingest")
        else:
            problem = _check_image_bytes(data, entry)
        if problem is not None:
            quarantined.append({"image_id": entry.image_id, "file": entry.file_name,
                                "reason": problem[0], "detail": problem[1]})
            dropped += len(entry.annotation_ids)
            continue
        rows.append({"image_id": entry.image_id, "file_name": entry.file_name, "width": entry.width,
                     "height": entry.height, "image": data, "annotation_ids": entry.annotation_ids,
                     "boxes": entry.boxes, "category_ids": entry.category_ids, "iscrowd": entry.iscrowd,
                     "areas": entry.areas})
    payload = encode_shard(rows)
    name = shard_name(index)
    write_shard_file(out.child(name), payload)
    info = ShardInfo(name, len(rows), sum(len(r["annotation_ids"]) for r in rows), len(payload),
                     hashlib.sha256(payload).hexdigest())
    result = ShardResult(info, quarantined, dropped)
    out.child(f"{WORK_DIR}/done/{name}.json").write_bytes(json.dumps(asdict(result)).encode())
    return result


def write_shard_file(location: Location, payload: bytes) -> None:
    location.write_bytes(payload)


# --- the whole ingest (driver) ---------------------------------------------------------------------
def _plan_digest(cfg: IngestConfig, annotation_bytes: bytes) -> str:
    hasher = hashlib.sha256(annotation_bytes)
    hasher.update(json.dumps([cfg.format, cfg.shard_size, resolve(cfg.images_uri).uri,
                              SHARD_FORMAT_VERSION]).encode())
    return hasher.hexdigest()


def _load_done(out: Location, plan_digest: str) -> Dict[str, ShardResult]:
    """Shards a previous run of the same plan finished; everything else of an old run is cleared."""
    plan = out.child(f"{WORK_DIR}/plan.json")
    previous = json.loads(plan.read_bytes()).get("plan_digest") if plan.exists() else None
    if previous != plan_digest:
        out.child(WORK_DIR).delete()
        plan.write_bytes(json.dumps({"plan_digest": plan_digest}).encode())
        return {}
    done, sizes = {}, out.file_sizes(recursive=False)
    for marker in out.child(f"{WORK_DIR}/done").list_files():
        result = json.loads(out.child(f"{WORK_DIR}/done/{marker}").read_bytes())
        info = ShardInfo(**result["info"])
        if sizes.get(info.name) == info.bytes:
            done[info.name] = ShardResult(info, result["quarantined"], result["dropped_annotations"])
    return done


def _run_shards(jobs: List[Tuple[int, List[ImageEntry]]], images: Location, out: Location,
                parallel: bool) -> List[ShardResult]:
    from tqdm import tqdm

    results: List[ShardResult] = []
    if not parallel:
        for index, entries in tqdm(jobs, unit="shard", desc="ingest", disable=not jobs):
            results.append(build_shard(index, entries, images, out))
        return results
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    progress = tqdm(total=len(jobs), unit="shard", desc="ingest", disable=not jobs)
    remote = ray.remote(num_cpus=1, max_retries=2)(build_shard)
    images_ref, out_ref = ray.put(images), ray.put(out)
    window = max(2, int(ray.cluster_resources().get("CPU", 1)) * 2)  # bounds driver memory
    pending, queue = [], list(jobs)
    while queue or pending:
        while queue and len(pending) < window:
            index, entries = queue.pop(0)
            pending.append(remote.remote(index, entries, images_ref, out_ref))
        finished, pending = ray.wait(pending, num_returns=1)
        results.extend(ray.get(finished))
        progress.update(len(finished))
    progress.close()
    return results


def ingest(cfg: IngestConfig) -> Manifest:
    """Ingest ``cfg.annotations_uri`` + ``cfg.images_uri`` into shards at ``cfg.out_uri``."""
    out, images = resolve(cfg.out_uri), resolve(cfg.images_uri)
    document, annotation_bytes = load_annotations(resolve(cfg.annotations_uri))
    plan_digest = _plan_digest(cfg, annotation_bytes)
    if out.child(MANIFEST_NAME).exists():
        existing = read_manifest(out.uri)
        if existing.plan_digest == plan_digest:
            try:
                verify_shards(out.uri)
                log.info("%s is already an ingest of these inputs; nothing to do", out.uri)
                return existing
            except DataError as exc:
                log.warning("re-ingesting: %s", exc)
        out.child(MANIFEST_NAME).delete()  # from here on the directory reads as unfinished

    quarantine: List[dict] = []
    stats: Counter = Counter()
    categories = check_categories(document["categories"], quarantine)
    log.info("listing images under %s", images.uri)
    available = set(images.list_files())
    entries = check_images(document["images"], available, images.uri, quarantine)
    check_annotations(document["annotations"], entries, categories, quarantine, stats)
    ordered = [entries[i] for i in sorted(entries) if entries[i].relative_path]
    if not ordered:
        raise DataError(f"{cfg.annotations_uri}: none of its {len(document['images'])} images was found "
                        f"under {images.uri}; check --images")
    for entry in ordered:  # canonical order inside a row: by annotation id
        order = sorted(range(len(entry.annotation_ids)), key=entry.annotation_ids.__getitem__)
        for name in ("annotation_ids", "boxes", "category_ids", "iscrowd", "areas"):
            setattr(entry, name, [getattr(entry, name)[k] for k in order])
    jobs = [(k, ordered[start:start + cfg.shard_size]) for k, start in enumerate(range(0, len(ordered), cfg.shard_size))]

    out.ensure_dir()
    done = _load_done(out, plan_digest)
    todo = [(k, e) for k, e in jobs if shard_name(k) not in done]
    log.info("%d images in %d shards (%d already done) -> %s", len(ordered), len(jobs), len(jobs) - len(todo), out.uri)
    results = {r.info.name: r for r in done.values()}
    results.update({r.info.name: r for r in _run_shards(todo, images, out, cfg.parallel)})
    shard_results = [results[shard_name(k)] for k, _ in jobs]

    wanted = {r.info.name for r in shard_results}
    for stale in out.list_files(recursive=False):  # shards of an earlier, larger ingest
        if stale.startswith("shard-") and stale.endswith(".parquet") and stale not in wanted:
            out.child(stale).delete()
    for result in shard_results:
        quarantine.extend(result.quarantined)
        stats["annotations_dropped_with_images"] += result.dropped_annotations
    shards = [r.info for r in shard_results]
    reasons = Counter(q["reason"] for q in quarantine)
    manifest = Manifest(
        format=cfg.format,
        images=sum(s.rows for s in shards),
        annotations=sum(s.annotations for s in shards),
        categories=categories,
        shards=shards,
        quarantined=quarantine,
        digest=content_digest(categories, shards),
        stats={"clipped_boxes": stats["clipped_boxes"],
               "annotations_dropped_with_images": stats["annotations_dropped_with_images"],
               "quarantined_by_reason": dict(sorted(reasons.items()))},
        source={"annotations": resolve(cfg.annotations_uri).uri, "images": images.uri},
        shard_size=cfg.shard_size,
        plan_digest=plan_digest,
    )
    out.child(MANIFEST_NAME).write_bytes(manifest.to_json())
    out.child(WORK_DIR).delete()
    log.info("wrote %d images, %d annotations in %d shards to %s; quarantined %d (%s)", manifest.images,
             manifest.annotations, len(shards), out.uri, len(quarantine),
             ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "none")
    return manifest
