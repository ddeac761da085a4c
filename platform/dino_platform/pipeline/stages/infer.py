"""Stage kind ``infer``: batch inference on Ray Data (``dino infer``): Parquet detections + manifest.json."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

from dino_platform.errors import ConfigError, DataError, StorageError
from dino_platform.pipeline.context import check_source_exists, model_reference
from dino_platform.pipeline.kind import StageKind, holds
from dino_platform.pipeline.spec import PipelineSpec, SourceRef
from dino_platform.pipeline.state import fingerprint
from dino_platform.serving.infer import MANIFEST_FILE, InferConfig, run_inference
from dino_platform.storage import resolve


@dataclass
class InferStage:
    """Batch inference on Ray Data (``dino infer``): Parquet detections + manifest.json under ``out``."""

    kind: str = "infer"
    model: SourceRef = field(default_factory=SourceRef)
    images: Optional[str] = None  # a prefix of image files, or:
    dataset: Optional[str] = None  # every image of a dataset's shards
    out: Optional[str] = None  # default <output_root>/detections/<stage>
    threshold: float = 0.05
    concurrency: int = 1  # model actors
    batch_size: int = 4
    part_size: int = 256
    coco_json: bool = False
    cpus_per_actor: float = 1.0
    use_gpu: Optional[bool] = None  # None: one GPU per actor when the cluster has GPUs


def _validate(scope, name: str, stage: InferStage) -> None:
    where = f"stages.{name}"
    scope.source(f"{where}.model", stage.model, ("model", "checkpoint"))
    if (stage.images is None) == (stage.dataset is None):
        raise ConfigError(f"{where}: give either images (a prefix of image files) or dataset")
    if stage.dataset is not None:
        scope.dataset(f"{where}.dataset", stage.dataset)
    InferConfig(model="-", out="-", images=stage.images or "-", threshold=stage.threshold,
                concurrency=stage.concurrency, batch_size=stage.batch_size, part_size=stage.part_size,
                cpus_per_actor=stage.cpus_per_actor).validate_fields(where)


def _preflight(spec: PipelineSpec, name: str, stage: InferStage) -> None:
    check_source_exists(spec, f"stages.{name}.model", stage.model)
    if stage.images is not None and not resolve(stage.images).list_files():
        raise DataError(f"stages.{name}.images: {stage.images} holds no files")


def _fingerprint(ctx, name: str, stage: InferStage) -> str:
    _, identity = model_reference(ctx, stage.model)
    if stage.dataset:
        data = ctx.dataset_digest(stage.dataset)
    else:  # the listing: new or changed images under the prefix re-run the stage (finished parts are kept)
        data = fingerprint(sorted(resolve(stage.images).file_sizes().items()))
    return fingerprint("infer", asdict(stage), identity, data)


def _run(ctx, name: str, stage: InferStage, fp: str):
    model_ref, identity = model_reference(ctx, stage.model)
    out = stage.out or f"{ctx.spec.output_root.rstrip('/')}/detections/{name}"
    manifest = run_inference(InferConfig(
        model=model_ref, out=out, images=stage.images,
        shards=ctx.spec.shards_uri(stage.dataset) if stage.dataset else None, threshold=stage.threshold,
        concurrency=stage.concurrency, batch_size=stage.batch_size, part_size=stage.part_size,
        coco_json=stage.coco_json, cpus_per_actor=stage.cpus_per_actor, use_gpu=stage.use_gpu,
        tracking_uri=ctx.tracking_uri))
    outputs = {"out": resolve(out).uri, "manifest": resolve(out).child(MANIFEST_FILE).uri, "model": model_ref,
               "model_identity": identity, "digest": manifest["digest"], "counts": manifest["counts"]}
    return outputs, {"images": manifest["counts"]["images"], "failed": manifest["counts"]["failed"],
                     "digest": manifest["digest"]}


def _outputs_exist(ctx, outputs: Dict[str, Any]) -> bool:
    return holds(lambda: json.loads(resolve(outputs["manifest"]).read_bytes()).get("digest") == outputs["digest"],
                 StorageError, KeyError, ValueError)


def _summary(out: Dict[str, Any]) -> str:
    c = out["counts"]
    return f"{out['out']}  ({c['images']} images, {c['detections']} detections, {c['failed']} unreadable; manifest.json)"


KIND = StageKind("infer", InferStage, ("detections",), _validate, _fingerprint, _run, _outputs_exist, _summary,
                 preflight=_preflight, datasets=lambda stage: [stage.dataset] if stage.dataset else [])
