"""``dino infer``: detections for every image of a bucket prefix or a shard directory, on Ray Data.

::

    image files / shard rows
      -> CPU tasks (map_batches): read, decode, the model's evaluation resize   -> uint8 pixels
      -> actor pool (map_batches with a callable class, ``concurrency`` actors, one GPU each when
         the cluster has GPUs, CPU actors otherwise; the model is loaded once per actor)
      -> the driver groups rows into parts; each complete part becomes OUT/part-NNNNN.parquet
    OUT/manifest.json: model URI and version, threshold, counts, unreadable images, digest

Each image is run alone at its own size, exactly as ``dino predict`` and evaluation run it (no
padding: see ``evaluation.inference``), so the rows equal ``dino predict``'s detections.

Parts are fixed before anything runs: ``part_size`` images of the sorted listing (``images``) or
one part per shard file (``shards``). A part's file records the key of its inputs, model and
settings; a re-run (after a kill, say) skips every part whose file exists with the same key, so
the job resumes where it stopped and ends with the same digest. An image that cannot be read or
decoded is listed in the manifest with its reason and never stops the job.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dino_platform.errors import ConfigError, DataError
from dino_platform.ray_session import connect
from dino_platform.storage import Location, resolve
from dino_platform.watchdog import watch, watched

log = logging.getLogger("dino.infer")

MANIFEST_FILE = "manifest.json"
COCO_RESULTS_FILE = "coco_results.json"
FORMAT = "dino-infer"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
KEY_META, DIGEST_META, FAILED_META = b"dino.infer.key", b"dino.infer.digest", b"dino.infer.failed"

# what the decode tasks hand the actors: one row per image, ``pixels`` empty where ``error`` says why
DECODED_SCHEMA = pa.schema([("part", pa.int64()), ("file", pa.string()), ("image_id", pa.int64()),
                            ("width", pa.int32()), ("height", pa.int32()), ("pixels", pa.binary()),
                            ("rh", pa.int32()), ("rw", pa.int32()), ("error", pa.string())])
OUTPUT_SCHEMA = pa.schema([
    ("file", pa.string()),
    ("image_id", pa.int64()),  # null when the input does not know it (a bucket of image files)
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # (x0, y0, x1, y1) original pixels, clipped
    ("scores", pa.list_(pa.float32())),  # descending
    ("labels", pa.list_(pa.int64())),  # dataset category ids
    ("label_names", pa.list_(pa.string())),
])


@dataclass
class InferConfig:
    """One ``dino infer`` job. Exactly one of ``images`` (a prefix of image files) or ``shards``."""

    model: str  # models:/name@alias, models:/name/3, a checkpoint directory, model.pt or an official .pth
    out: str  # local directory or s3:// prefix
    images: Optional[str] = None
    shards: Optional[str] = None
    threshold: float = 0.05  # detections scoring below are not written
    concurrency: int = 1  # model actors
    batch_size: int = 4  # images handed to an actor per call (each is still run alone)
    part_size: int = 256  # images per output file (``images`` input; shards give one part each)
    coco_json: bool = False  # also write OUT/coco_results.json
    use_gpu: Optional[bool] = None  # None: one GPU per actor when the cluster has GPUs
    cpus_per_actor: float = 1.0
    cpus_per_decode_task: float = 0.5
    tracking_uri: Optional[str] = None  # for models:/ URIs (default $MLFLOW_TRACKING_URI)
    preset: Optional[str] = None  # official .pth files only
    num_classes: Optional[int] = None
    # seconds without a predicted batch (the first one included) before the job reports and fails
    stall_timeout_s: float = 600.0

    def validate(self) -> None:
        if (self.images is None) == (self.shards is None):
            raise ConfigError("infer: give exactly one of images (a prefix of image files) or shards "
                              "(a shard directory from `dino ingest`)")
        if not self.model:
            raise ConfigError("infer.model: required (models:/name@alias or a checkpoint URI)")
        if not self.out:
            raise ConfigError("infer.out: required (a directory or s3:// prefix)")
        self.validate_fields("infer")

    def validate_fields(self, where: str) -> None:
        """The numeric settings; ``where`` names them in errors (``infer``, ``stages.NAME``)."""
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"{where}.threshold: {self.threshold} must be in [0, 1]")
        for name in ("concurrency", "batch_size", "part_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: {getattr(self, name)} must be >= 1")
        for name in ("cpus_per_actor", "cpus_per_decode_task", "stall_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name}: {getattr(self, name)} must be > 0")


@dataclass
class _Part:
    index: int
    key: str  # digest of the inputs, model and settings: a file with another key is redone
    files: List[str]  # images input: paths below the prefix; shards input: [shard file name]
    rows: int

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}.parquet"


# ---------------------------------------------------------------------------------------------
# CPU tasks: read + decode + evaluation resize


def _decode_batch(batch: pa.Table, eval_cfg, root: Optional[Location]) -> pa.Table:
    """Rows with ``pixels`` (uint8 [3, h, w] bytes at the evaluation size) or an ``error``.

    ``batch``: ``part``, ``file``, ``image_id``, and the encoded ``image`` when ``root`` is None (shards)."""
    from PIL import Image

    from dino_platform.data.transforms import eval_plan, render, to_chw

    rows = []
    for row in batch.to_pylist():
        data = row.pop("image", None)
        row.update(width=0, height=0, pixels=b"", rh=0, rw=0, error=None)
        try:
            if root is not None:
                data = root.child(row["file"]).read_bytes()
            with Image.open(io.BytesIO(data)) as picture:  # as Detector.detect opens it
                picture.load()
                row["width"], row["height"] = picture.size
            chw = to_chw(render(data, row["width"], row["height"], eval_plan(row["width"], row["height"], eval_cfg)))
            row.update(rh=chw.shape[1], rw=chw.shape[2], pixels=chw.tobytes())
        except Exception as exc:  # unreadable or corrupt: listed in the manifest, never fatal
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


# ---------------------------------------------------------------------------------------------
# the actor pool: one model per actor


class DetectorActor:
    """Callable class for ``map_batches``: the driver's ``load_artifact(...).detector()``, each image run alone."""

    def __init__(self, detector, threshold: float, cpus: float):
        import ray
        import torch

        from dino_platform.data.transforms import transform_configs

        if isinstance(detector, ray.ObjectRef):
            detector = ray.get(detector)
        self.detector = detector
        self.threshold = float(threshold)
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(round(cpus))))
        self.detector.model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        _, eval_cfg = transform_configs(detector.transform)
        self.mean, self.std = eval_cfg.mean, eval_cfg.std

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from dino_platform.data.transforms import normalize_into

        out: Dict[str, list] = {k: [] for k in ("boxes", "scores", "labels", "label_names")}
        names = self.detector.categories
        for row in batch.select(["pixels", "error", "rh", "rw", "width", "height"]).to_pylist():
            boxes = np.zeros((0, 4), np.float32)
            scores, labels = np.zeros(0, np.float32), np.zeros(0, np.int64)
            if row["error"] is None:
                chw = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(3, row["rh"], row["rw"])
                image = torch.from_numpy(normalize_into(np.empty(chw.shape, np.float32), chw, self.mean, self.std))
                scores, labels, boxes = self.detector.predict(image[None], row["height"], row["width"])
                confident = scores >= self.threshold  # a prefix: the scores are in descending order
                scores, labels, boxes = scores[confident], labels[confident], boxes[confident]
            out["boxes"].append(boxes.tolist())
            out["scores"].append(scores.tolist())
            out["labels"].append(labels.tolist())
            out["label_names"].append([names.get(int(c), str(int(c))) for c in labels])
        kept = batch.select(["part", "file", "image_id", "width", "height", "error"])
        for name, values in out.items():
            kept = kept.append_column(name, pa.array(values, OUTPUT_SCHEMA.field(name).type))
        return kept


# ---------------------------------------------------------------------------------------------
# the driver


def run_inference(cfg: InferConfig) -> Dict[str, Any]:
    """Run (or resume) the job; returns the manifest document (also written to OUT/manifest.json)."""
    import ray
    import ray.data

    from dino_platform.data.transforms import transform_configs
    from dino_platform.model.artifact import load_artifact

    cfg.validate()
    started = time.time()
    out = resolve(cfg.out)
    out.ensure_dir()
    detector = load_artifact(cfg.model, tracking_uri=cfg.tracking_uri, preset=cfg.preset,
                             num_classes=cfg.num_classes).detector()
    settings = {"model": _model_identity(cfg), "threshold": cfg.threshold, "transform": detector.transform}
    source, parts = _plan(cfg, settings)
    recorded = {p.index: _recorded_part(out.child(p.name)) for p in parts}
    done = {i: r for i, r in recorded.items() if r is not None and r["key"] == parts[i].key}  # parts[i].index == i
    todo = [p for p in parts if p.index not in done]
    total = sum(p.rows for p in parts)
    log.info("infer: %d images in %d parts; %d parts already written, %d to run", total, len(parts),
             len(done), len(todo))
    if todo:
        connect()
        use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
        cpus = ray.cluster_resources().get("CPU", 0)
        if cfg.concurrency * cfg.cpus_per_actor + cfg.cpus_per_decode_task > cpus:
            # actors hold their CPUs for the whole job: with none left, no decode task ever runs
            log.warning("infer: %d actors x %.2g CPU + a %.2g-CPU decode task exceed the cluster's %.3g CPUs; "
                        "the job waits until the cluster grows (lower --concurrency or --cpus-per-actor)",
                        cfg.concurrency, cfg.cpus_per_actor, cfg.cpus_per_decode_task, cpus)
        _, eval_cfg = transform_configs(detector.transform)
        dataset = _source_dataset(cfg, source, todo, eval_cfg)
        predicted = dataset.map_batches(
            DetectorActor, batch_format="pyarrow", batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            num_gpus=1 if use_gpu else 0, num_cpus=cfg.cpus_per_actor,
            fn_constructor_kwargs={"detector": ray.put(detector), "threshold": cfg.threshold,
                                   "cpus": cfg.cpus_per_actor})
        by_index = {p.index: p for p in todo}
        pending: Dict[int, List[pa.Table]] = {p.index: [] for p in todo}
        finished_images = sum(d["images"] + len(d["failed"]) for d in done.values())
        batches = predicted.iter_batches(batch_size=None, batch_format="pyarrow")
        with watch("dino infer", cfg.stall_timeout_s, details=lambda: f"pipeline:\n{predicted.stats()}") as beat:
            for batch in watched(batches, beat, "predicted batch"):
                for index in set(batch.column("part").to_pylist()):
                    part = by_index[index]
                    pending[index].append(batch.filter(pc.equal(batch.column("part"), index)))
                    if sum(rows.num_rows for rows in pending[index]) == part.rows:
                        done[index] = _write_part(out.child(part.name), part, pa.concat_tables(pending.pop(index)))
                        finished_images += part.rows
                        log.info("infer: %s written (%d/%d images, %d parts to go)", part.name, finished_images,
                                 total, len(pending))
        if pending:
            raise DataError(f"infer: parts {sorted(pending)} received fewer rows than planned; re-run to finish")
    manifest = _manifest(cfg, source, settings, parts, done, time.time() - started)
    if cfg.coco_json:
        out.child(COCO_RESULTS_FILE).write_bytes(json.dumps(_coco_results(out, parts)).encode())
        manifest["coco_json"] = out.child(COCO_RESULTS_FILE).uri
    out.child(MANIFEST_FILE).write_bytes(json.dumps(manifest, indent=1).encode())
    log.info("infer: %d images, %d detections >= %.2f, %d unreadable; %s (digest %s)",
             manifest["counts"]["images"], manifest["counts"]["detections"], cfg.threshold,
             manifest["counts"]["failed"], out.child(MANIFEST_FILE).uri, manifest["digest"][:12])
    return manifest


def _model_identity(cfg: InferConfig) -> Dict[str, Any]:
    if cfg.model.startswith("models:/"):
        from dino_platform.registry.models import resolve_version

        version = resolve_version(cfg.model, cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""))
        return {"uri": cfg.model, "name": version.name, "version": str(version.version), "source": version.source}
    return {"uri": cfg.model, "version": None}


def _plan(cfg: InferConfig, settings: Dict[str, Any]) -> Tuple[Dict[str, Any], List[_Part]]:
    """(what was read, the parts): fixed by the input listing alone, so a re-run plans the same parts."""
    if cfg.images is not None:
        root = resolve(cfg.images)
        sizes = root.file_sizes()
        files = sorted(f for f in sizes if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise DataError(f"{cfg.images}: no image files ({', '.join(IMAGE_SUFFIXES)}) below this prefix")
        chunks = [files[i:i + cfg.part_size] for i in range(0, len(files), cfg.part_size)]
        parts = [_Part(i, _key(settings, [(f, sizes[f]) for f in chunk]), chunk, len(chunk))
                 for i, chunk in enumerate(chunks)]
        return {"images": root.uri, "root": root}, parts
    from dino_platform.data.manifest import shard_locations, verify_shards

    manifest = verify_shards(cfg.shards)
    locations = shard_locations(cfg.shards, manifest)
    if not locations:
        raise DataError(f"{cfg.shards}: the manifest lists no shards; re-run `dino ingest`")
    parts = [_Part(i, _key(settings, [shard.name, shard.sha256]), [shard.name], shard.rows)
             for i, shard in enumerate(manifest.shards)]
    return {"shards": resolve(cfg.shards).uri, "shards_digest": manifest.digest, "locations": locations}, parts


def _key(settings: Dict[str, Any], inputs: Any) -> str:
    return hashlib.sha256(json.dumps([settings, inputs], sort_keys=True, default=str).encode()).hexdigest()


def _source_dataset(cfg: InferConfig, source: Dict[str, Any], todo: List[_Part], eval_cfg):
    import ray.data

    remote_args = {"num_cpus": cfg.cpus_per_decode_task}
    if "root" in source:
        items = [{"part": p.index, "file": f, "image_id": None} for p in todo for f in p.files]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items) // 8))
        return dataset.map_batches(_decode_batch, batch_format="pyarrow", batch_size=8,
                                   fn_kwargs={"eval_cfg": eval_cfg, "root": source["root"]}, **remote_args)
    locations = {p.index: source["locations"][p.index] for p in todo}
    part_of = {loc.path: index for index, loc in locations.items()}
    dataset = ray.data.read_parquet([loc.path for loc in locations.values()],
                                    filesystem=next(iter(locations.values())).fs,
                                    columns=["file_name", "image_id", "image"], include_paths=True)
    return dataset.map_batches(_shard_rows, batch_format="pyarrow", fn_kwargs={"part_of": part_of},
                               **remote_args).map_batches(
        _decode_batch, batch_format="pyarrow", batch_size=8, fn_kwargs={"eval_cfg": eval_cfg, "root": None},
        **remote_args)


def _shard_rows(batch: pa.Table, part_of: Dict[str, int]) -> pa.Table:
    parts = [part_of[p.split("://", 1)[-1]] for p in batch.column("path").to_pylist()]  # paths without scheme
    return pa.table({"part": pa.array(parts, pa.int64()), "file": batch.column("file_name"),
                     "image_id": batch.column("image_id"), "image": batch.column("image")})


def _write_part(location: Location, part: _Part, rows: pa.Table) -> Dict[str, Any]:
    """Write one part: readable images as rows (sorted by file), unreadable ones in its metadata."""
    failed_mask = pc.is_valid(rows.column("error"))
    failed = rows.filter(failed_mask).select(["file", "error"]).rename_columns(["file", "reason"]).to_pylist()
    failed.sort(key=lambda d: d["file"])
    good = rows.filter(pc.invert(failed_mask))
    good = good.take(pc.sort_indices(good, [("file", "ascending"), ("image_id", "ascending")]))
    table = good.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
    digest = _table_digest(table, failed)
    table = table.replace_schema_metadata({KEY_META: part.key.encode(), DIGEST_META: digest.encode(),
                                           FAILED_META: json.dumps(failed).encode()})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    location.write_bytes(sink.getvalue())  # whole file or nothing: a killed job leaves no half part
    return {"key": part.key, "digest": digest, "images": table.num_rows, "failed": failed,
            "detections": int(pc.sum(pc.list_value_length(table.column("scores"))).as_py() or 0)}


def _recorded_part(location: Location) -> Optional[Dict[str, Any]]:
    """What an existing part file records, or None when it is missing or unreadable (then it is redone)."""
    try:
        if not location.exists():
            return None
        with location.fs.open_input_file(location.path) as handle:
            parquet = pq.ParquetFile(handle)
            meta = parquet.schema_arrow.metadata or {}
            images = parquet.metadata.num_rows
            scores = parquet.read(columns=["scores"]).column("scores")
        detections = int(pc.sum(pc.list_value_length(scores)).as_py() or 0)
        return {"key": meta[KEY_META].decode(), "digest": meta[DIGEST_META].decode(), "images": images,
                "failed": json.loads(meta[FAILED_META]), "detections": detections}
    except Exception as exc:  # a foreign or damaged file: recompute the part
        log.warning("infer: %s is unreadable (%s); it will be redone", location.uri, exc)
        return None


def _table_digest(table: pa.Table, failed: List[Dict[str, str]]) -> str:
    """sha256 over every row's values (fixed widths, in file order) and the unreadable files."""
    digest = hashlib.sha256()
    for row in table.to_pylist():
        digest.update(json.dumps([row["file"], row["image_id"], row["width"], row["height"], row["labels"],
                                  row["label_names"]]).encode())
        digest.update(np.asarray(row["boxes"], np.float32).reshape(-1, 4).tobytes())
        digest.update(np.asarray(row["scores"], np.float32).tobytes())
    digest.update(json.dumps(failed, sort_keys=True).encode())
    return digest.hexdigest()


def _manifest(cfg: InferConfig, source: Dict[str, Any], settings: Dict[str, Any], parts: List[_Part],
              done: Dict[int, Dict[str, Any]], elapsed: float) -> Dict[str, Any]:
    ordered = [done[p.index] for p in parts]
    failed = [f for d in ordered for f in d["failed"]]
    digest = hashlib.sha256(json.dumps([settings, [d["digest"] for d in ordered]], sort_keys=True,
                                       default=str).encode()).hexdigest()
    return {
        "format": FORMAT, "format_version": 1,
        "model": settings["model"], "threshold": cfg.threshold, "transform": settings["transform"],
        "input": {k: v for k, v in source.items() if k in ("images", "shards", "shards_digest")},
        "columns": OUTPUT_SCHEMA.names,
        "counts": {"inputs": sum(p.rows for p in parts), "images": sum(d["images"] for d in ordered),
                   "failed": len(failed), "detections": sum(d["detections"] for d in ordered), "parts": len(parts)},
        "parts": [{"file": p.name, "images": d["images"], "detections": d["detections"], "digest": d["digest"]}
                  for p, d in zip(parts, ordered)],
        "failed": failed,
        "digest": digest,
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("tracking_uri",)},
        "elapsed_s": round(elapsed, 3),  # this invocation only; not part of the digest
    }


def _coco_results(out: Location, parts: List[_Part]) -> List[Dict[str, Any]]:
    """COCO results (``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``); the file name
    stands in for ``image_id`` where the input does not know it."""
    results = []
    for part in parts:
        location = out.child(part.name)
        with location.fs.open_input_file(location.path) as handle:
            table = pq.read_table(handle, columns=["file", "image_id", "boxes", "scores", "labels"])
        for row in table.to_pylist():
            image_id = row["image_id"] if row["image_id"] is not None else row["file"]
            for (x0, y0, x1, y1), score, label in zip(row["boxes"], row["scores"], row["labels"]):
                results.append({"image_id": image_id, "category_id": label,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    return results
