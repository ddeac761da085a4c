"""Stage kind ``evaluate``: COCO AP of a checkpoint on a dataset's shards (``dino eval``), one MLflow run."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

from dino_platform.errors import ConfigError
from dino_platform.evaluation.coco_eval import EvalProtocol
from dino_platform.pipeline.context import check_source_exists, weights_identity, weights_source
from dino_platform.pipeline.kind import StageKind, WorkerGroup
from dino_platform.pipeline.spec import PipelineSpec, SourceRef
from dino_platform.pipeline.state import fingerprint
from dino_platform.pipeline.validation import validate_model

log = logging.getLogger("dino.pipeline")


@dataclass
class ModelSpec:
    """The model of weights that do not record it (official .pth files): as ``dino train``'s model section."""

    preset: str = "dino_tiny"
    num_classes: int = 91  # max category id + 1 (COCO: 91, Objects365: 366)
    overrides: Dict[str, Any] = field(default_factory=dict)  # dino_core DinoConfig fields


@dataclass
class Resources:
    workers: int = 1
    cpus_per_worker: float = 0.5
    gpus_per_worker: int = 0  # 0 (CPU) or 1 (one process per GPU)


@dataclass
class EvaluateStage:
    kind: str = "evaluate"
    checkpoint: SourceRef = field(default_factory=SourceRef)
    data: str = ""
    # needed only for weights that do not record their model (official .pth files)
    model: Optional[ModelSpec] = None
    transform: Optional[Dict[str, Any]] = None
    resources: Resources = field(default_factory=Resources)
    batch_size: int = 2
    # the COCO AP protocol, as in `dino train`'s eval section (evaluation.coco_eval.EvalProtocol):
    # null = official DINO (all num_select detections), 100 = COCO-challenge top 100 per image
    detections_per_image: Optional[int] = None
    max_dets: int = 100
    engine: str = "faster_coco_eval"


def _validate(scope, name: str, stage: EvaluateStage) -> None:
    where = f"stages.{name}"
    scope.source(f"{where}.checkpoint", stage.checkpoint, ("checkpoint",))
    scope.dataset(f"{where}.data", stage.data)
    if stage.model is not None:
        validate_model(f"{where}.model", stage.model)
    r = stage.resources
    if r.gpus_per_worker not in (0, 1):
        raise ConfigError(f"{where}.resources.gpus_per_worker: {r.gpus_per_worker} must be 0 or 1 (one worker "
                          "process per GPU; use more workers for more GPUs)")
    if r.workers < 1 or r.cpus_per_worker <= 0:
        raise ConfigError(f"{where}.resources: workers ({r.workers}) must be >= 1 and cpus_per_worker "
                          f"({r.cpus_per_worker}) > 0")
    if stage.batch_size < 1:
        raise ConfigError(f"{where}.batch_size: must be >= 1")
    try:
        EvalProtocol(detections_per_image=stage.detections_per_image, max_dets=stage.max_dets, engine=stage.engine)
    except ValueError as exc:
        raise ConfigError(f"{where}.{exc}") from None


def _workers(spec: PipelineSpec, name: str, stage: EvaluateStage) -> WorkerGroup:
    r = stage.resources
    return WorkerGroup("resources", r.workers, r.cpus_per_worker, r.gpus_per_worker)


def _fingerprint(ctx, name: str, stage: EvaluateStage) -> str:
    return fingerprint("evaluate", asdict(stage), ctx.dataset_digest(stage.data),
                       weights_identity(ctx, stage.checkpoint))


def _run(ctx, name: str, stage: EvaluateStage, fp: str):
    from dino_platform.evaluation.runner import run_evaluation

    checkpoint, lineage = weights_source(ctx, stage.checkpoint)
    model = asdict(stage.model) if stage.model is not None else None  # None: what the checkpoint records
    transform = dict(stage.transform) if stage.transform is not None else None
    r = stage.resources
    data_uri = ctx.spec.shards_uri(stage.data)
    log.info("stage %s: COCO evaluation of %s on %s", name, checkpoint, data_uri)
    result = run_evaluation(checkpoint, data_uri, num_workers=r.workers, batch_size=stage.batch_size,
                            detections_per_image=stage.detections_per_image, max_dets=stage.max_dets,
                            engine=stage.engine, model=model, transform=transform,
                            use_gpu=r.gpus_per_worker > 0, cpus_per_worker=r.cpus_per_worker)
    stats = result["stats"]
    lineage = {**lineage, "datasets": {**lineage.get("datasets", {}), stage.data: ctx.dataset_digest(stage.data)},
               "configs": {**lineage.get("configs", {}), name: fingerprint(asdict(stage))}}
    run_id = _log_evaluation(ctx, name, stage, checkpoint, result, lineage, fp)
    log.info("stage %s: AP %.4f AP50 %.4f (MLflow run %s)", name, stats["AP"], stats["AP50"], run_id)
    outputs = {"checkpoint": checkpoint, "metrics": stats, "run_id": run_id, "model": result["model"],
               "transform": result["transform"], "data": stage.data, "lineage": lineage, "protocol": result["protocol"]}
    return outputs, {"AP": stats["AP"], "AP50": stats["AP50"]}


def _log_evaluation(ctx, name: str, stage: EvaluateStage, checkpoint: str, result: Dict[str, Any],
                    lineage: Dict[str, Any], fp: str) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from dino_platform.evaluation.coco_eval import protocol_tags

    client = MlflowClient(ctx.tracking_uri)
    experiment = client.get_experiment_by_name(ctx.spec.experiment)
    producers = [run for run in lineage.get("runs", {}).values() if run]
    tags = {"dino.pipeline": ctx.spec.name, "dino.stage": name, "dino.fingerprint": fp, "checkpoint": checkpoint,
            "data": stage.data, "git_commit": ctx.git_commit,
            **{f"parent_run.{s}": run for s, run in lineage.get("runs", {}).items() if run},
            **{f"data_digest.{d}": digest for d, digest in lineage.get("datasets", {}).items()},
            **protocol_tags(result["protocol"])}
    if producers:
        tags["mlflow.parentRunId"] = producers[-1]  # shown nested under the run that trained the checkpoint
    run = client.create_run(experiment.experiment_id, run_name=f"{name}-{fp[:10]}", tags=tags)
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in result["stats"].items()])
    client.log_dict(run.info.run_id, result, "coco_eval.json")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _outputs_exist(ctx, outputs: Dict[str, Any]) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not outputs.get("run_id"):
        return False
    try:
        MlflowClient(ctx.tracking_uri).get_run(outputs["run_id"])
        return True
    except MlflowException:
        return False


def _summary(out: Dict[str, Any]) -> str:
    return f"AP {out['metrics']['AP']:.4f}  AP50 {out['metrics']['AP50']:.4f}  (MLflow run {out['run_id']})"


KIND = StageKind("evaluate", EvaluateStage, ("checkpoint", "metrics"), _validate, _fingerprint, _run, _outputs_exist,
                 _summary, workers=_workers, datasets=lambda stage: [stage.data],
                 preflight=lambda spec, name, stage: check_source_exists(spec, f"stages.{name}.checkpoint",
                                                                         stage.checkpoint))
