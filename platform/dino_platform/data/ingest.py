"""COCO / Objects365 annotations + images -> Parquet shards and ``manifest.json``.

The driver streams the annotation JSON once (ijson's C parser, hashing the bytes as they pass) and
keeps the records as numpy columns, never a Python object per box, so that Objects365's 25M boxes
fit a modest head node. It lists the image store, checks every record, groups the kept annotations
by image with one sort and cuts the images, sorted by id, into shards of ``shard_size``. One task
per shard (Ray, or in-process) receives only its own slice of the columns, decodes every image
fully to prove it sound, writes the shard and records it as done. The manifest is written last,
after stale shards are removed: a shard directory without a manifest is unfinished.

Bad input never stops the run and is never silent: each rejected item goes to
``manifest.quarantined`` with a :class:`Reason` code, in the order of the file. Malformed JSON or
an unreachable store is a clear error naming the file. Re-running after an interruption with the
same inputs keeps the shards recorded as done under ``_ingest/`` and ends with byte-identical shards.

NOTE: the streaming parser accepts strict JSON only: ``NaN``/``Infinity``, integers beyond 64 bits
and UTF-16/32 files are refused with an error that says so (``json.loads`` would accept them).
"""
from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import io
import json
import logging
import math
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Literal, Optional, Set, Tuple

import ijson
import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from dino_platform.data.manifest import (
    MANIFEST_NAME, SHARD_FORMAT_VERSION, Manifest, ShardInfo, content_digest, encode_shard,
    read_manifest, shard_name, verify_shards,
)
from dino_platform.errors import ConfigError, DataError, StallError
from dino_platform.storage import Location, StorageNotFoundError, resolve

try:  # ijson's C parser (yajl2_c); its pure-Python fallback is correct but ~30x slower
    from ijson.backends import yajl2_c as json_stream
except ImportError:  # pragma: no cover - a platform without ijson's binary wheel
    json_stream = ijson

log = logging.getLogger(__name__)

IngestFormat = Literal["coco", "o365"]
WORK_DIR = "_ingest"  # progress markers of an unfinished ingest, removed when it commits
READ_CHUNK = 1 << 20  # bytes per read of the annotation file
EXACT_ERROR_LIMIT = 64 << 20  # a malformed file up to this size is re-read to name the line and column
COLUMN_CHUNK = 1 << 16  # records per column chunk: annotations are checked, then freed, a chunk at a time
LISTING_THREADS = 16


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
    # seconds without a finished shard task before the job reports where it waits and fails
    stall_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.format not in ("coco", "o365"):
            raise ConfigError(f"format: {self.format!r} is not one of 'coco', 'o365'")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size: must be >= 1, got {self.shard_size}")
        if not self.stall_timeout_s > 0:
            raise ConfigError(f"stall_timeout_s: must be > 0, got {self.stall_timeout_s}")


@dataclass
class ShardSlice:
    """What one shard task receives: its images (ascending id) and their annotations.

    Image ``i``'s annotations are rows ``offsets[i]:offsets[i + 1]`` of the annotation arrays,
    ordered by annotation id. Boxes are already clipped to the image: ``[m, 4]`` COCO
    ``[x, y, w, h]`` in pixels.
    """

    image_ids: np.ndarray       # int64 [n]
    file_names: List[str]       # as in the annotation file
    relative_paths: List[str]   # under the images location
    widths: np.ndarray          # int64 [n]
    heights: np.ndarray         # int64 [n]
    offsets: np.ndarray         # int64 [n + 1]
    annotation_ids: np.ndarray  # int64 [m]
    boxes: np.ndarray           # float64 [m, 4]
    category_ids: np.ndarray    # int64 [m]
    iscrowd: np.ndarray         # int8 [m]
    areas: np.ndarray           # float64 [m]


@dataclass
class ShardResult:
    info: ShardInfo
    quarantined: List[Dict[str, Any]]
    dropped_annotations: int  # annotations that left with a quarantined image


# --- reading the annotation JSON as a stream (driver) ---------------------------------------------
class _ImageRecords:
    """The ``images`` list, checked record by record as it streams past, kept as columns."""

    def __init__(self) -> None:
        self.count = 0  # records seen, sound or not
        self.positions, self.ids = array.array("q"), array.array("q")
        self.widths, self.heights = array.array("q"), array.array("q")
        self._names: List[str] = []
        self._name_chunks: List[pa.Array] = []
        self.quarantine: List[Tuple[int, dict]] = []  # (record position, entry)

    def add(self, record: Any) -> None:
        position = self.count
        self.count += 1
        if type(record) is dict:
            image_id, file_name = record.get("id"), record.get("file_name")
            width, height = record.get("width"), record.get("height")
            if type(image_id) is int and type(file_name) is str and type(width) is int and width > 0 \
                    and type(height) is int and height > 0:
                self.positions.append(position)
                self.ids.append(image_id)
                self.widths.append(width)
                self.heights.append(height)
                self._names.append(file_name)
                if len(self._names) == COLUMN_CHUNK:
                    self._name_chunks.append(pa.array(self._names, pa.large_string()))
                    self._names = []
                return
        self.quarantine.append((position, {
            "image": repr(record)[:200], "reason": Reason.MALFORMED_IMAGE_RECORD,
            "detail": "an image needs an integer id, a file_name and positive integer width and height"}))

    def file_names(self) -> pa.Array:
        chunks = self._name_chunks + [pa.array(self._names, pa.large_string())]
        self._names, self._name_chunks = [], []
        return pa.concat_arrays(chunks)


# per-annotation state decided while streaming (the checks that need no other part of the file)
_SOUND, _MALFORMED_BBOX, _NON_POSITIVE, _MALFORMED_IDS = 0, 1, 2, 3


class _AnnotationChunk:
    """COLUMN_CHUNK consecutive annotation records, as typed columns of fixed capacity (no
    reallocation while they fill, so no heap fragments left behind)."""

    _COLUMNS = {  # name: array typecode, also the numpy dtype ("q" int64, "d" float64, "B" uint8, "b" int8)
        "ids": "q", "image_ids": "q", "category_ids": "q",
        "x": "d", "y": "d", "w": "d", "h": "d",  # the bbox as given (floats); clipped once checked
        "int_mask": "B",  # bit k: bbox[k] was an integer (for the details' repr)
        "state": "B", "iscrowd": "b",
        "areas": "d"}  # NaN where the record's area is absent or unusable

    def __init__(self, first: int) -> None:
        self.first = first  # position of its first record in the ``annotations`` list
        self.size = 0
        for name, code in self._COLUMNS.items():
            setattr(self, name, array.array(code, [0]) * COLUMN_CHUNK)

    def column(self, name: str) -> np.ndarray:
        """The filled part of column ``name`` (a view)."""
        return np.frombuffer(getattr(self, name), dtype=self._COLUMNS[name], count=self.size)


class _AnnotationRecords:
    """The ``annotations`` list, checked record by record as it streams past, kept as columns."""

    def __init__(self) -> None:
        self.count = 0
        self.chunks: List[_AnnotationChunk] = [_AnnotationChunk(0)]
        self.quarantine: List[Tuple[int, dict]] = []
        self.details: Dict[int, str] = {}  # position -> detail of a box refused while streaming

    def add(self, record: Any) -> None:
        position = self.count
        self.count += 1
        chunk = self.chunks[-1]
        if chunk.size == COLUMN_CHUNK:
            chunk = _AnnotationChunk(position)
            self.chunks.append(chunk)
        row = chunk.size
        chunk.size += 1
        ann_id = image_id = category_id = None
        if type(record) is dict:
            ann_id, image_id, category_id = record.get("id"), record.get("image_id"), record.get("category_id")
        if type(ann_id) is not int or type(image_id) is not int or type(category_id) is not int:
            self.quarantine.append((position, {
                "annotation": repr(record)[:200], "reason": Reason.MALFORMED_ANNOTATION,
                "detail": "an annotation needs integer id, image_id and category_id"}))
            chunk.state[row], chunk.areas[row] = _MALFORMED_IDS, math.nan
            return
        chunk.ids[row], chunk.image_ids[row], chunk.category_ids[row] = ann_id, image_id, category_id
        bbox = record.get("bbox")
        mask = _box_int_mask(bbox)
        if mask < 0:
            self.details[position] = f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r:.80}"
            chunk.state[row] = _MALFORMED_BBOX
            mask = 0
        else:
            x, y, w, h = (float(v) for v in bbox)
            chunk.x[row], chunk.y[row], chunk.w[row], chunk.h[row] = x, y, w, h
            if w <= 0 or h <= 0:
                self.details[position] = f"bbox {list(bbox)} has width or height <= 0"
                chunk.state[row] = _NON_POSITIVE
        chunk.int_mask[row] = mask
        crowd = record.get("iscrowd", 0)
        chunk.iscrowd[row] = 1 if crowd in (1, True) else 0
        area = record.get("area")
        sound_area = type(area) in (int, float) and math.isfinite(area) and area >= 0
        chunk.areas[row] = float(area) if sound_area else math.nan


def _box_int_mask(bbox: Any) -> int:
    """-1 unless ``bbox`` is 4 finite numbers; else bit k set where ``bbox[k]`` is an integer."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return -1
    mask = 0
    for k, value in enumerate(bbox):
        kind = type(value)
        if kind is int:
            mask |= 1 << k
        elif kind is not float or not math.isfinite(value):
            return -1
    return mask


@dataclass
class AnnotationFile:
    """The annotation JSON after one streamed pass: categories as records, the rest as columns."""

    categories: List[Any]
    images: _ImageRecords
    annotations: _AnnotationRecords
    hasher: Any  # hashlib sha256 over the file's bytes, left open for the plan digest


class _SectionPrefix(str):
    """An ijson prefix equal to each of ``<section>.item``: one C parser builds the records of
    every section.

    ijson compares each event's path with its prefix through ``==``, and Python asks the right
    operand first when it is a str subclass; outside a record that costs one call per record.
    Records are handed over in file order; ``marks`` says at which index of the parser's output
    list each run of one section starts.
    """

    def __new__(cls, buffer: list) -> "_SectionPrefix":
        prefix = super().__new__(cls, "<one of the sections>.item")
        prefix.sections = {f"{name}.item": name for name in ("categories", "images", "annotations")}
        prefix.buffer, prefix.marks, prefix.current = buffer, [], None
        return prefix

    def __eq__(self, other: object) -> bool:
        section = self.sections.get(other)  # type: ignore[call-overload]
        if section is None:
            return False
        if section != self.current:
            self.marks.append((len(self.buffer), section))
            self.current = section
        return True

    __hash__ = str.__hash__


def _section_parser() -> Tuple[Any, list, _SectionPrefix]:
    buffer = ijson.sendable_list()
    prefix = _SectionPrefix(buffer)
    return json_stream.items_coro(buffer, prefix, use_float=True), buffer, prefix


@functools.lru_cache(maxsize=None)
def _one_parser_works() -> bool:
    """Whether this ijson dispatches every section through one parser (checked once, on a tiny document)."""
    parser, buffer, prefix = _section_parser()
    parser.send(b'{"images": [1], "annotations": [{"a": 2}], "categories": [3]}')
    parser.close()
    return list(buffer) == [1, {"a": 2}, 3] and [s for _, s in prefix.marks] == ["images", "annotations", "categories"]


def read_annotation_file(location: Location) -> AnnotationFile:
    """Stream ``location`` once: check its records into columns and hash its bytes."""
    if not _one_parser_works():  # pragma: no cover - ijson is pinned (pyproject.toml)
        raise RuntimeError("this ijson does not dispatch every section through one parser; install ijson==3.6.0")
    categories: List[Any] = []
    images, annotations = _ImageRecords(), _AnnotationRecords()
    consumers: Dict[str, Callable[[Any], None]] = {
        "categories": categories.append, "images": images.add, "annotations": annotations.add}
    parser, buffer, prefix = _section_parser()
    marks, current = prefix.marks, None

    def hand_over() -> None:  # the records the parser finished, to their section's consumer
        nonlocal current
        mark = 0
        for index, record in enumerate(buffer):
            while mark < len(marks) and marks[mark][0] <= index:
                current = marks[mark][1]
                mark += 1
            consumers[current](record)
        if mark < len(marks):
            current = marks[-1][1]
        del buffer[:]
        del marks[:]

    hasher, seen = hashlib.sha256(), 0
    try:
        for chunk in location.iter_chunks(READ_CHUNK):
            hasher.update(chunk)
            seen += len(chunk)
            parser.send(chunk)
            hand_over()
        parser.close()
        hand_over()
    except (ijson.JSONError, UnicodeDecodeError) as exc:
        raise _malformed_json(location, exc, seen) from None
    counts = {"categories": len(categories), "images": images.count, "annotations": annotations.count}
    if not all(counts.values()):  # an empty, missing or misshapen section: look at the layout
        _check_layout(location)
    return AnnotationFile(categories, images, annotations, hasher)


def _malformed_json(location: Location, exc: Exception, seen: int) -> DataError:
    if location.size() <= EXACT_ERROR_LIMIT:  # small enough to re-read with json to name the line and column
        try:
            json.loads(location.read_bytes())
        except json.JSONDecodeError as error:
            return DataError(f"{location.uri}: malformed JSON at line {error.lineno} column {error.colno}: "
                             f"{error.msg}; fix or re-download the annotation file")
        except UnicodeDecodeError as error:
            return DataError(f"{location.uri}: not UTF-8 JSON ({error.reason}); is this the annotation file?")
        return DataError(f"{location.uri}: not strict JSON ({str(exc).splitlines()[0]}); NaN, Infinity, "
                         "integers beyond 64 bits and non-UTF-8 encodings are not accepted: re-export the file")
    return DataError(f"{location.uri}: malformed JSON within its first {seen:,} bytes: "
                     f"{str(exc).splitlines()[0]}; fix or re-download the annotation file")


_EVENT_TYPES = {"start_map": "dict", "start_array": "list", "string": "str", "boolean": "bool", "null": "NoneType"}


def _check_layout(location: Location) -> None:
    """Raise DataError unless the file is an object whose images/annotations/categories are lists.

    A second pass over the parse events (slower than the record pass), taken only when a section gave no records.
    """
    events = ijson.sendable_list()
    parser = json_stream.parse_coro(events, use_float=True)
    top, kinds, key = None, {}, None
    for chunk in location.iter_chunks(READ_CHUNK):
        parser.send(chunk)
        for prefix, event, value in events:
            if top is None:
                top = type(value).__name__ if event == "number" else _EVENT_TYPES.get(event, event)
            if key is not None:  # the first event after a top-level key is that value's start
                kinds[key], key = event, None
            elif prefix == "" and event == "map_key":
                key = value
        del events[:]
    parser.close()
    if top != "dict":
        raise DataError(f"{location.uri}: expected a COCO-style JSON object, got {top}")
    for section in ("images", "annotations", "categories"):
        if kinds.get(section) != "start_array":
            raise DataError(f"{location.uri}: field {section!r} is missing or not a list; "
                            "expected COCO-style JSON with images, annotations and categories")


# --- checking the records (driver) -----------------------------------------------------------------
def check_categories(records: Iterable[Any], quarantine: List[dict]) -> Dict[int, str]:
    categories: Dict[int, str] = {}
    for record in records:
        if type(record) is not dict or type(record.get("id")) is not int or type(record.get("name")) is not str:
            quarantine.append({"category": repr(record)[:200], "reason": Reason.MALFORMED_CATEGORY,
                               "detail": "a category needs an integer id and a string name"})
        elif record["id"] in categories:
            quarantine.append({"category_id": record["id"], "reason": Reason.DUPLICATE_CATEGORY_ID,
                               "detail": f"id {record['id']} is used again by {record['name']!r}; kept "
                                         f"{categories[record['id']]!r}"})
        else:
            categories[record["id"]] = record["name"]
    return categories


def _path_parts(file_name: str) -> List[str]:
    return [p for p in file_name.replace("\\", "/").split("/") if p not in ("", ".")]


def _resolve_start(file_name: str, available: Set[str]) -> int:
    """How many leading components of ``file_name`` to drop to find it in ``available``; -1: none.

    The path itself comes first, then the path with its leading components stripped one by one
    (Objects365's JSON says ``images/v1/patch8/x.jpg`` for a file stored as ``patch8/x.jpg``).
    """
    parts = _path_parts(file_name)
    for start in range(len(parts)):
        if "/".join(parts[start:]) in available:
            return start
    return -1


def list_images(images: Location) -> Set[str]:
    """Every file below ``images`` ('/'-separated, relative): one listing per top-level folder, in
    parallel (a 1.7M-object S3 listing from one thread takes minutes)."""
    available = set(images.file_sizes(recursive=False))
    folders = images.subdirectories()
    with ThreadPoolExecutor(max_workers=max(1, min(LISTING_THREADS, len(folders)))) as pool:
        for folder, names in zip(folders, pool.map(lambda f: images.child(f).list_files(), folders)):
            available.update(f"{folder}/{name}" for name in names)
    return available


@dataclass
class KnownImages:
    """Each image id's first sound record (the one kept), in ascending id order."""

    ids: np.ndarray        # int64
    widths: np.ndarray     # int64
    heights: np.ndarray    # int64
    starts: np.ndarray     # int16: leading components stripped to find the file; -1: not found
    file_names: pa.Array   # large_string


def check_images(records: _ImageRecords, available: Set[str],
                 images_uri: str) -> Tuple[KnownImages, List[Tuple[int, dict]]]:
    """Duplicate ids and missing files; returns the known images and (position, entry) quarantines."""
    quarantine = list(records.quarantine)
    positions = np.frombuffer(records.positions, dtype=np.int64)
    ids = np.frombuffer(records.ids, dtype=np.int64)
    names = records.file_names()
    order = np.argsort(ids, kind="stable")  # equal ids keep file order: the first is kept
    sorted_ids = ids[order]
    first = np.ones(len(ids), dtype=bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group_first = order[np.maximum.accumulate(np.where(first, np.arange(len(ids)), 0))]
    for k in np.flatnonzero(~first):
        row, kept = int(order[k]), int(group_first[k])
        quarantine.append((int(positions[row]), {
            "image_id": int(ids[row]), "file": names[row].as_py(), "reason": Reason.DUPLICATE_IMAGE_ID,
            "detail": f"image id {int(ids[row])} already names {names[kept].as_py()}; kept the first"}))
    kept_rows = order[first]  # ascending id
    kept_names = names.take(pa.array(kept_rows))
    starts = np.empty(len(kept_rows), dtype=np.int16)
    for begin in range(0, len(kept_rows), COLUMN_CHUNK):
        batch = kept_names.slice(begin, COLUMN_CHUNK).to_pylist()
        for k, file_name in enumerate(batch, begin):
            starts[k] = _resolve_start(file_name, available)
            if starts[k] < 0:
                row = int(kept_rows[k])
                quarantine.append((int(positions[row]), {
                    "image_id": int(ids[row]), "file": file_name, "reason": Reason.MISSING_IMAGE,
                    "detail": f"not found under {images_uri}"}))
    widths = np.frombuffer(records.widths, dtype=np.int64)[kept_rows]
    heights = np.frombuffer(records.heights, dtype=np.int64)[kept_rows]
    return KnownImages(sorted_ids[first], widths, heights, starts, kept_names), quarantine


def _repeated_ids(chunks: List[_AnnotationChunk], count: int) -> np.ndarray:
    """bool [count]: the record repeats the id of an earlier record with sound ids."""
    sound = [c.column("state") != _MALFORMED_IDS for c in chunks]
    ids = np.concatenate([c.column("ids")[m] for m, c in zip(sound, chunks)])
    duplicate = np.zeros(count, dtype=bool)
    if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()):  # ids increase through the file: no repeats
        return duplicate
    order = np.argsort(ids, kind="stable")  # equal ids keep file order: the first is kept
    ids = ids[order]
    repeats = order[np.flatnonzero(ids[1:] == ids[:-1]) + 1]  # indices among the sound records
    del ids, order
    ends = np.cumsum([int(m.sum()) for m in sound])
    for k in repeats.tolist():  # back to positions in the file, chunk by chunk
        c = int(np.searchsorted(ends, k, side="right"))
        local = k - (int(ends[c - 1]) if c else 0)
        duplicate[chunks[c].first + int(np.flatnonzero(sound[c])[local])] = True
    return duplicate


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise: the many chunk-sized
    arrays freed here lie in its heap, and the large arrays allocated next are mapped afresh)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


@dataclass
class GroupedAnnotations:
    """The sound annotations, sorted by (image, annotation id); ``image_rows`` indexes the images
    that have a file (ascending id)."""

    image_rows: np.ndarray    # int64: rank of the annotation's image among the images with a file
    ids: np.ndarray           # int64
    x: np.ndarray             # float64: the box, clipped to the image, COCO [x, y, w, h] in pixels
    y: np.ndarray
    w: np.ndarray
    h: np.ndarray
    category_ids: np.ndarray  # int64
    iscrowd: np.ndarray       # int8
    areas: np.ndarray         # float64


def check_annotations(records: _AnnotationRecords, known: KnownImages, categories: Dict[int, str],
                      stats: Counter) -> Tuple[GroupedAnnotations, List[Tuple[int, dict]]]:
    """Attach each sound annotation to one of ``known`` (not empty) with its box clipped to the image;
    quarantine the rest.

    The checks apply in a fixed order and a record is quarantined for the first it fails: malformed
    ids, duplicate id (the first record with a sound id is kept), unknown image, unknown category,
    malformed or non-positive box, image without a file (dropped with it), box outside the image.
    """
    quarantine = list(records.quarantine)
    duplicate = _repeated_ids(records.chunks, records.count)
    category_ids = np.fromiter(sorted(categories), dtype=np.int64, count=len(categories))
    file_rank = np.cumsum(known.starts >= 0, dtype=np.int64) - 1  # row among the images with a file
    for chunk in records.chunks:  # one chunk at a time; its kept annotations are compacted in place
        quarantine += _check_chunk(chunk, duplicate[chunk.first:chunk.first + chunk.size], known, category_ids,
                                   file_rank, records.details, stats)
    records.details.clear()
    return _join_chunks(records.chunks), quarantine


def _check_chunk(chunk: _AnnotationChunk, dup: np.ndarray, known: KnownImages, category_ids: np.ndarray,
                 file_rank: np.ndarray, details: Dict[int, str], stats: Counter) -> List[Tuple[int, dict]]:
    """The (position, entry) quarantines of one chunk; its kept annotations move to its front, clipped.
    ``known`` holds at least one image."""
    image_ids, state = chunk.column("image_ids"), chunk.column("state")
    rows = np.minimum(np.searchsorted(known.ids, image_ids), len(known.ids) - 1)  # the image's row in known
    known_image, has_file = known.ids[rows] == image_ids, known.starts[rows] >= 0
    live = (state != _MALFORMED_IDS) & ~dup
    unknown_image = live & ~known_image
    unknown_category = live & known_image & ~np.isin(chunk.column("category_ids"), category_ids)
    checked = live & known_image & ~unknown_category
    passed = checked & (state == _SOUND)
    stats["annotations_dropped_with_images"] += int((passed & ~has_file).sum())
    quarantine = _refusals(chunk, dup, unknown_image, unknown_category, checked & (state != _SOUND), details)

    placed = np.flatnonzero(passed & has_file)
    x, y, w, h = (chunk.column(c)[placed] for c in "xywh")
    width, height = known.widths[rows[placed]].astype(np.float64), known.heights[rows[placed]].astype(np.float64)
    # max(x, 0.0) / min(x + w, width) exactly as Python's builtins pick (they keep -0.0)
    x0, y0 = np.where(0.0 > x, 0.0, x), np.where(0.0 > y, 0.0, y)
    x1, y1 = np.where(width < x + w, width, x + w), np.where(height < y + h, height, y + h)
    inside = ~((x1 <= x0) | (y1 <= y0))
    stats["clipped_boxes"] += int(((x0 != x) | (y0 != y) | (x1 != x + w) | (y1 != y + h))[inside].sum())
    ids, masks = chunk.column("ids"), chunk.column("int_mask")
    for j in np.flatnonzero(~inside).tolist():  # boxes outside their images; ints printed as in the file
        row, image, mask = int(placed[j]), int(rows[placed[j]]), int(masks[placed[j]])
        box = repr([int(v) if mask >> k & 1 else float(v) for k, v in enumerate((x[j], y[j], w[j], h[j]))])
        quarantine.append((chunk.first + row, {
            "annotation_id": int(ids[row]), "image_id": int(image_ids[row]), "reason": Reason.BOX_OUTSIDE_IMAGE,
            "detail": f"bbox {box} lies outside the {int(known.widths[image])}x{int(known.heights[image])} image"}))
    _compact(chunk, placed[inside], (x0[inside], y0[inside], x1[inside], y1[inside]),
             file_rank[rows[placed[inside]]])
    return quarantine


def _refusals(chunk: _AnnotationChunk, dup: np.ndarray, unknown_image: np.ndarray, unknown_category: np.ndarray,
              box_refused: np.ndarray, details: Dict[int, str]) -> List[Tuple[int, dict]]:
    """(position, entry) of the chunk's records refused before their box is placed, in file order."""
    ids, image_ids, cats, state = (chunk.column(c) for c in ("ids", "image_ids", "category_ids", "state"))
    refused = []
    for row in np.flatnonzero(dup | unknown_image | unknown_category | box_refused):
        position = chunk.first + int(row)
        entry = {"annotation_id": int(ids[row]), "image_id": int(image_ids[row])}
        if dup[row]:
            entry.update(reason=Reason.DUPLICATE_ANNOTATION_ID,
                         detail=f"annotation id {int(ids[row])} appears more than once; kept the first")
        elif unknown_image[row]:
            entry.update(reason=Reason.UNKNOWN_IMAGE_ID, detail=f"no image has id {int(image_ids[row])}")
        elif unknown_category[row]:
            entry.update(reason=Reason.UNKNOWN_CATEGORY_ID,
                         detail=f"category id {int(cats[row])} is not among the categories")
        else:
            entry.update(reason=Reason.MALFORMED_ANNOTATION if state[row] == _MALFORMED_BBOX
                         else Reason.NON_POSITIVE_BOX, detail=details[position])
        refused.append((position, entry))
    return refused


def _compact(chunk: _AnnotationChunk, kept_rows: np.ndarray, corners: Tuple[np.ndarray, ...],
             image_rows: np.ndarray) -> None:
    """Keep only ``kept_rows`` of the chunk, moved to its front: boxes clipped to ``corners`` (x0, y0, x1, y1),
    missing areas from the clipped box, image ids replaced by ``image_rows`` (rows among images with a file)."""
    x0, y0, x1, y1 = corners
    kept = len(kept_rows)
    areas = chunk.column("areas")
    areas[:kept] = np.where(np.isnan(areas[kept_rows]), (x1 - x0) * (y1 - y0), areas[kept_rows])
    for name, clipped in zip("xywh", (x0, y0, x1 - x0, y1 - y0)):
        chunk.column(name)[:kept] = clipped
    chunk.column("image_ids")[:kept] = image_rows
    for name in ("ids", "category_ids", "iscrowd"):
        values = chunk.column(name)
        values[:kept] = values[kept_rows]
    chunk.size = kept
    chunk.int_mask = chunk.state = None


def _join_chunks(chunks: List[_AnnotationChunk]) -> GroupedAnnotations:
    """The chunks' kept annotations in canonical order (by image, then id); each column's chunks
    are freed as soon as it is joined, and the list is emptied."""
    columns = {}
    for source, name in (("image_ids", "image_rows"), ("ids", "ids"), ("category_ids", "category_ids"),
                         ("iscrowd", "iscrowd"), ("areas", "areas"), ("x", "x"), ("y", "y"), ("w", "w"), ("h", "h")):
        columns[name] = np.concatenate([c.column(source) for c in chunks])
        for c in chunks:
            setattr(c, source, None)
        release_freed_memory()
    chunks.clear()
    order = np.lexsort((columns["ids"], columns["image_rows"]))
    for name in columns:  # one column at a time: the transient is one column
        columns[name] = columns[name][order]
    return GroupedAnnotations(**columns)


# --- the shard plan (driver) -----------------------------------------------------------------------
class ShardPlan:
    """The images with a file (ascending id) and their annotations, cut into shards on demand."""

    def __init__(self, known: KnownImages, annotations: GroupedAnnotations, shard_size: int) -> None:
        rows = np.flatnonzero(known.starts >= 0)
        self.image_ids, self.widths, self.heights = known.ids[rows], known.widths[rows], known.heights[rows]
        self.starts = known.starts[rows]
        self.file_names = known.file_names.take(pa.array(rows))
        counts = np.bincount(annotations.image_rows, minlength=len(rows))
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.annotations = annotations
        self.shard_size = shard_size
        self.images, self.num_shards = len(rows), math.ceil(len(rows) / shard_size)

    def shard(self, index: int) -> ShardSlice:
        begin, end = index * self.shard_size, min(self.images, (index + 1) * self.shard_size)
        first, last = int(self.offsets[begin]), int(self.offsets[end])
        names = self.file_names.slice(begin, end - begin).to_pylist()
        a = self.annotations
        return ShardSlice(
            image_ids=self.image_ids[begin:end].copy(), file_names=names,
            relative_paths=["/".join(_path_parts(name)[int(s):]) for name, s in zip(names, self.starts[begin:end])],
            widths=self.widths[begin:end].copy(), heights=self.heights[begin:end].copy(),
            offsets=self.offsets[begin:end + 1] - first,
            annotation_ids=a.ids[first:last].copy(),
            boxes=np.stack([a.x[first:last], a.y[first:last], a.w[first:last], a.h[first:last]], axis=1),
            category_ids=a.category_ids[first:last].copy(), iscrowd=a.iscrowd[first:last].copy(),
            areas=a.areas[first:last].copy())


# --- building one shard (task) ---------------------------------------------------------------------
def _check_image_bytes(data: bytes, width: int, height: int) -> Optional[Tuple[str, str]]:
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
    if size != (width, height):
        return Reason.IMAGE_SIZE_MISMATCH, f"file is {size[0]}x{size[1]}, annotations say {width}x{height}"
    return None


def build_shard(index: int, shard: ShardSlice, images: Location, out: Location) -> ShardResult:
    """Read, check and write shard ``index``; record it under ``_ingest/`` as done."""
    rows, quarantined, dropped = [], [], 0
    ann_ids, boxes = shard.annotation_ids.tolist(), shard.boxes.tolist()
    cats, crowds, areas = shard.category_ids.tolist(), shard.iscrowd.tolist(), shard.areas.tolist()
    offsets = shard.offsets.tolist()
    for i, (image_id, file_name, relative, width, height) in enumerate(zip(
            shard.image_ids.tolist(), shard.file_names, shard.relative_paths, shard.widths.tolist(),
            shard.heights.tolist())):
        begin, end = offsets[i], offsets[i + 1]
        try:
            data = images.child(relative).read_bytes()
        except StorageNotFoundError:  # listed, then gone
            problem = (Reason.MISSING_IMAGE, f"{images.uri}/{relative} disappeared during ingest")
        else:
            problem = _check_image_bytes(data, width, height)
        if problem is not None:
            quarantined.append({"image_id": image_id, "file": file_name, "reason": problem[0], "detail": problem[1]})
            dropped += end - begin
            continue
        rows.append({"image_id": image_id, "file_name": file_name, "width": width, "height": height,
                     "image": data, "annotation_ids": ann_ids[begin:end], "boxes": boxes[begin:end],
                     "category_ids": cats[begin:end], "iscrowd": crowds[begin:end], "areas": areas[begin:end]})
    payload = encode_shard(rows)
    name = shard_name(index)
    out.child(name).write_bytes(payload)
    info = ShardInfo(name, len(rows), sum(len(r["annotation_ids"]) for r in rows), len(payload),
                     hashlib.sha256(payload).hexdigest())
    result = ShardResult(info, quarantined, dropped)
    out.child(f"{WORK_DIR}/done/{name}.json").write_bytes(json.dumps(asdict(result)).encode())
    return result


# --- the whole ingest (driver) ---------------------------------------------------------------------
def _load_done(out: Location, plan_digest: str) -> Dict[str, ShardResult]:
    """Shards a run of the same plan finished; the work of a run of another plan is cleared."""
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


def _run_shards(todo: List[int], plan: ShardPlan, images: Location, out: Location,
                parallel: bool, stall_timeout_s: float) -> List[ShardResult]:
    from tqdm import tqdm

    if not parallel:
        return [build_shard(index, plan.shard(index), images, out)
                for index in tqdm(todo, unit="shard", desc="ingest", disable=not todo)]
    import ray

    from dino_platform.ray_session import connect

    connect(log_to_driver=False)
    progress = tqdm(total=len(todo), unit="shard", desc="ingest", disable=not todo)
    remote = ray.remote(num_cpus=1, max_retries=2)(build_shard)
    images_ref, out_ref = ray.put(images), ray.put(out)
    # a bounded window of shards in flight: each task's slice is put in the object store when it
    # is submitted and released when it is done, so the driver never holds more than the window
    window = max(2, int(ray.cluster_resources().get("CPU", 1)) * 2)
    pending, queue = [], list(todo)
    results: List[ShardResult] = []
    while queue or pending:
        while queue and len(pending) < window:
            index = queue.pop(0)
            pending.append(remote.remote(index, ray.put(plan.shard(index)), images_ref, out_ref))
        finished, pending = ray.wait(pending, num_returns=1, timeout=stall_timeout_s)
        if not finished:
            from dino_platform.watchdog import cluster_report

            raise StallError(f"STALL: dino ingest: no shard task finished in {stall_timeout_s:.0f} s "
                             f"(stall_timeout_s); {len(pending)} shard tasks submitted and unfinished, "
                             f"{len(queue)} queued, {len(results)} done. Each shard task asks for 1 CPU."
                             f"\n{cluster_report()}".rstrip())
        results.extend(ray.get(finished))
        progress.update(len(finished))
    progress.close()
    return results


def ingest(cfg: IngestConfig) -> Manifest:
    """Ingest ``cfg.annotations_uri`` + ``cfg.images_uri`` into shards at ``cfg.out_uri``."""
    out, images = resolve(cfg.out_uri), resolve(cfg.images_uri)
    source = read_annotation_file(resolve(cfg.annotations_uri))
    # the plan digest: sha256 over the annotation file's bytes, then the settings that shape the shards
    source.hasher.update(json.dumps([cfg.format, cfg.shard_size, images.uri, SHARD_FORMAT_VERSION]).encode())
    plan_digest = source.hasher.hexdigest()
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
    categories = check_categories(source.categories, quarantine)
    log.info("listing images under %s", images.uri)
    available = list_images(images)
    known, image_quarantine = check_images(source.images, available, images.uri)
    del available
    if not (known.starts >= 0).any():
        raise DataError(f"{cfg.annotations_uri}: none of its {source.images.count} images was found "
                        f"under {images.uri}; check --images")
    grouped, annotation_quarantine = check_annotations(source.annotations, known, categories, stats)
    for stage in (image_quarantine, annotation_quarantine):  # in the order of the file
        quarantine.extend(entry for _, entry in sorted(stage, key=lambda item: item[0]))
    plan = ShardPlan(known, grouped, cfg.shard_size)
    del source, known, grouped, image_quarantine, annotation_quarantine

    out.ensure_dir()
    done = _load_done(out, plan_digest)
    todo = [k for k in range(plan.num_shards) if shard_name(k) not in done]
    log.info("%d images in %d shards (%d already done) -> %s", plan.images, plan.num_shards,
             plan.num_shards - len(todo), out.uri)
    done.update({r.info.name: r for r in _run_shards(todo, plan, images, out, cfg.parallel, cfg.stall_timeout_s)})
    shard_results = [done[shard_name(k)] for k in range(plan.num_shards)]

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
