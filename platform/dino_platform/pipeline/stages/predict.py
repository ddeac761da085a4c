"""Stage kind ``predict``: drawn PNGs + ``detections.json`` for a few images (``dino predict``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pyarrow.parquet as pq

from dino_platform.data.manifest import read_manifest, shard_locations
from dino_platform.errors import ConfigError, DataError, StorageError
from dino_platform.model.artifact import load_artifact
from dino_platform.pipeline.context import check_source_exists, model_reference
from dino_platform.pipeline.kind import StageKind, holds
from dino_platform.pipeline.spec import PipelineSpec, SourceRef
from dino_platform.pipeline.state import fingerprint
from dino_platform.storage import resolve


@dataclass
class PredictStage:
    kind: str = "predict"
    model: SourceRef = field(default_factory=SourceRef)
    images: List[str] = field(default_factory=list)  # image URIs, or:
    dataset: Optional[str] = None  # the first `limit` images of a dataset's shards
    limit: int = 2
    threshold: float = 0.3
    max_drawn: Optional[int] = None  # draw at most this many of the boxes above the threshold
    out: Optional[str] = None  # default <output_root>/predictions/<stage>


def _validate(scope, name: str, stage: PredictStage) -> None:
    where = f"stages.{name}"
    scope.source(f"{where}.model", stage.model, ("model", "checkpoint"))
    if bool(stage.images) == (stage.dataset is not None):
        raise ConfigError(f"{where}: give either images (a list of URIs) or dataset (+ limit)")
    if stage.dataset is not None:
        scope.dataset(f"{where}.dataset", stage.dataset)
    if stage.limit < 1:
        raise ConfigError(f"{where}.limit: {stage.limit} must be >= 1")
    if stage.max_drawn is not None and stage.max_drawn < 1:
        raise ConfigError(f"{where}.max_drawn: {stage.max_drawn} must be >= 1")
    if not 0.0 <= stage.threshold <= 1.0:
        raise ConfigError(f"{where}.threshold: {stage.threshold} must be in [0, 1]")


def _preflight(spec: PipelineSpec, name: str, stage: PredictStage) -> None:
    check_source_exists(spec, f"stages.{name}.model", stage.model)
    for i, uri in enumerate(stage.images):
        if not resolve(uri).is_file():
            raise DataError(f"stages.{name}.images[{i}]: {uri} does not exist")


def _fingerprint(ctx, name: str, stage: PredictStage) -> str:
    _, identity = model_reference(ctx, stage.model)
    data = ctx.dataset_digest(stage.dataset) if stage.dataset else None
    return fingerprint("predict", asdict(stage), identity, data)


def _run(ctx, name: str, stage: PredictStage, fp: str):
    from dino_platform.serving.predict import predict_to_directory

    model_ref, identity = model_reference(ctx, stage.model)
    if stage.dataset:
        images = first_images(ctx.spec.shards_uri(stage.dataset), stage.limit)
    else:
        images = [(uri.rstrip("/").rsplit("/", 1)[-1], resolve(uri).read_bytes()) for uri in stage.images]
    out = stage.out or f"{ctx.spec.output_root.rstrip('/')}/predictions/{name}"
    detector = load_artifact(model_ref, tracking_uri=ctx.tracking_uri).detector()
    document = predict_to_directory(detector, images, out, threshold=stage.threshold, max_drawn=stage.max_drawn)
    outputs = {"out": resolve(out).uri, "model": model_ref, "model_identity": identity, "json": document["json"],
               "pngs": [item["png"] for item in document["images"]],
               "drawn": [sum(d["drawn"] for d in item["detections"]) for item in document["images"]]}
    return outputs, {"pngs": outputs["pngs"]}


def first_images(shards_uri: str, limit: int) -> List[Tuple[str, bytes]]:
    """(file name, encoded bytes) of the first ``limit`` images stored in a shard directory."""
    images: List[Tuple[str, bytes]] = []
    for location in shard_locations(shards_uri, read_manifest(shards_uri)):
        with location.fs.open_input_file(location.path) as handle:
            table = pq.read_table(handle, columns=["file_name", "image"])
        for row in table.slice(0, limit - len(images)).to_pylist():
            images.append((row["file_name"].rsplit("/", 1)[-1], row["image"]))
        if len(images) >= limit:
            break
    return images


def _outputs_exist(ctx, outputs: Dict[str, Any]) -> bool:
    return holds(lambda: all(resolve(u).exists() for u in [*outputs["pngs"], outputs["json"]]), StorageError, KeyError)


def _summary(out: Dict[str, Any]) -> str:
    return f"{out['out']}  ({', '.join(Path(p).name for p in out['pngs'])}, detections.json)"


KIND = StageKind("predict", PredictStage, ("images",), _validate, _fingerprint, _run, _outputs_exist, _summary,
                 preflight=_preflight, datasets=lambda stage: [stage.dataset] if stage.dataset else [])
