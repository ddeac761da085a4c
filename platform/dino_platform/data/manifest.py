"""What a shard directory holds: the Parquet row schema and ``manifest.json``.

A shard directory (local or ``s3://``) written by ``dino ingest``::

    manifest.json           # written last: its presence means the shards are complete
    shard-00000.parquet     # one row per image, schema SHARD_SCHEMA
    shard-00001.parquet
    ...

A shard row holds the encoded image bytes as they were in the source (JPEG/PNG), the image's
identity and size, and its annotations as parallel lists (COCO ``[x, y, w, h]`` boxes in pixels,
raw dataset category ids, ``iscrowd`` flags, areas).
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List

import pyarrow as pa
import pyarrow.parquet as pq

from dino_platform.errors import DataError
from dino_platform.storage import Location, StorageNotFoundError, resolve

MANIFEST_NAME = "manifest.json"
SHARD_FORMAT_VERSION = 1
ROW_GROUP_SIZE = 64  # rows per Parquet row group: the unit Ray Data can split a shard into

SHARD_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("file_name", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("image", pa.binary()),                               # encoded bytes, as in the source
    ("annotation_ids", pa.list_(pa.int64())),
    ("boxes", pa.list_(pa.list_(pa.float64(), 4))),       # COCO [x, y, w, h], pixels
    ("category_ids", pa.list_(pa.int64())),
    ("iscrowd", pa.list_(pa.int8())),
    ("areas", pa.list_(pa.float64())),
])


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def encode_shard(rows: List[Dict[str, Any]]) -> bytes:
    """Parquet bytes of ``rows`` (dicts with SHARD_SCHEMA's fields), identical for identical rows."""
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(
        table, sink, row_group_size=ROW_GROUP_SIZE,
        compression={name: ("none" if name == "image" else "zstd") for name in SHARD_SCHEMA.names},
        write_statistics=[n for n in SHARD_SCHEMA.names if n != "image"],
    )
    return sink.getvalue()


@dataclass
class ShardInfo:
    name: str
    rows: int
    annotations: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """``manifest.json`` of a shard directory.

    ``categories``: dataset category id -> name, as in the source annotations.
    ``quarantined``: one entry per rejected image, annotation or category, each with ``reason``
    (a code from ``ingest.Reason``), ``detail`` and ``file``/``image_id``/``annotation_id``.
    ``stats``: further counts, e.g. ``clipped_boxes`` (boxes cut back to the image).
    ``digest``: sha256 over the categories and every shard's sha256, in order.
    """

    format: str
    images: int
    annotations: int
    categories: Dict[int, str]
    shards: List[ShardInfo]
    quarantined: List[Dict[str, Any]]
    digest: str
    stats: Dict[str, Any] = field(default_factory=dict)
    source: Dict[str, str] = field(default_factory=dict)
    shard_size: int = 0
    plan_digest: str = ""
    shard_format_version: int = SHARD_FORMAT_VERSION

    def to_json(self) -> bytes:
        document = asdict(self)
        document["categories"] = {str(k): v for k, v in sorted(self.categories.items())}
        return json.dumps(document, indent=1, sort_keys=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, uri: str) -> "Manifest":
        try:
            document = json.loads(data)
            document["categories"] = {int(k): v for k, v in document["categories"].items()}
            document["shards"] = [ShardInfo(**s) for s in document["shards"]]
            return cls(**document)
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{uri}: not a dino-platform manifest ({exc}); re-run `dino ingest`") from None


def content_digest(categories: Dict[int, str], shards: List[ShardInfo]) -> str:
    hasher = hashlib.sha256()
    hasher.update(json.dumps(sorted(categories.items())).encode())
    for shard in shards:
        hasher.update(f"{shard.name}:{shard.rows}:{shard.sha256}\n".encode())
    return hasher.hexdigest()


def read_manifest(uri: str) -> Manifest:
    """The manifest of the shard directory ``uri`` (or of ``uri`` naming manifest.json itself)."""
    location = resolve(uri)
    if location.name != MANIFEST_NAME:
        location = location.child(MANIFEST_NAME)
    try:
        data = location.read_bytes()
    except StorageNotFoundError:
        raise DataError(f"{location.uri}: no manifest; {uri} is not a finished `dino ingest` output "
                        "(an interrupted ingest writes its manifest last: re-run it)") from None
    return Manifest.from_json(data, location.uri)


def shard_root(uri: str) -> Location:
    """The shard directory of ``uri`` (the directory itself or its manifest.json)."""
    root = resolve(uri)
    return resolve(uri.rstrip("/").rsplit("/", 1)[0]) if root.name == MANIFEST_NAME else root


def shard_locations(uri: str, manifest: Manifest) -> List[Location]:
    root = shard_root(uri)
    return [root.child(shard.name) for shard in manifest.shards]


def verify_shards(uri: str, deep: bool = False) -> Manifest:
    """Check the shards of ``uri`` against its manifest; return the manifest or raise DataError.

    Always: every shard exists with the recorded size (one listing of the directory).
    ``deep``: also every shard's sha256 and row count (reads every byte) and the manifest's digest.
    """
    manifest = read_manifest(uri)
    sizes = shard_root(uri).file_sizes(recursive=False)
    problems = []
    for shard, location in zip(manifest.shards, shard_locations(uri, manifest)):
        if shard.name not in sizes:
            problems.append(f"{shard.name} is missing")
        elif sizes[shard.name] != shard.bytes:
            problems.append(f"{shard.name} has {sizes[shard.name]} bytes, manifest says {shard.bytes}")
        elif deep:
            data = location.read_bytes()
            rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
            if hashlib.sha256(data).hexdigest() != shard.sha256:
                problems.append(f"{shard.name} content differs from its sha256 in the manifest")
            elif rows != shard.rows:
                problems.append(f"{shard.name} has {rows} rows, manifest says {shard.rows}")
    if deep and content_digest(manifest.categories, manifest.shards) != manifest.digest:
        problems.append("the manifest's digest does not match its shard list")
    if sum(s.rows for s in manifest.shards) != manifest.images:
        problems.append("the shards' row counts do not add up to the manifest's image count")
    if problems:
        raise DataError(f"{uri}: shards do not match the manifest: {'; '.join(problems)}; "
                        "re-run `dino ingest` into a fresh location")
    return manifest


def read_ground_truth(uri: str) -> Dict[str, Any]:
    """COCO-format ground truth (images, annotations, categories) of a shard directory.

    Reads only the annotation columns; the result can be fed to ``pycocotools.coco.COCO``
    (``coco.dataset = gt; coco.createIndex()``) for evaluation.
    """
    manifest = read_manifest(uri)
    images, annotations = [], []
    columns = [n for n in SHARD_SCHEMA.names if n != "image"]
    for location in shard_locations(uri, manifest):
        with location.fs.open_input_file(location.path) as handle:
            table = pq.read_table(handle, columns=columns)
        for row in table.to_pylist():
            images.append({"id": row["image_id"], "file_name": row["file_name"],
                           "width": row["width"], "height": row["height"]})
            for ann_id, box, cat, crowd, area in zip(row["annotation_ids"], row["boxes"], row["category_ids"],
                                                     row["iscrowd"], row["areas"]):
                annotations.append({"id": ann_id, "image_id": row["image_id"], "category_id": cat,
                                    "bbox": list(box), "iscrowd": int(crowd), "area": area})
    categories = [{"id": cid, "name": name} for cid, name in sorted(manifest.categories.items())]
    return {"images": images, "annotations": annotations, "categories": categories}
