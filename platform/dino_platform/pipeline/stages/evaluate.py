"""Stage kind ``evaluate``: COCO AP of a checkpoint on a dataset's shards (``dino eval``), one MLflow run."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Dict, Optional

from dino_platform.errors import ConfigError
from dino_platform.evaluation.coco_eval import EvalConfig, protocol_tags
from dino_platform.pipeline.context import check_source_exists, weights_identity, weights_source
from dino_platform.pipeline.kind import StageKind, WorkerGroup, holds
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
    # batch_size and the COCO AP protocol: `dino train`'s eval section (evaluation.coco_eval.EvalConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    MOVED: ClassVar[Dict[str, str]] = {key: f"eval.{key}" for key in (
        "batch_size", "detections_per_image", "max_dets", "engine")}


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


def _workers(spec: PipelineSpec, name: str, stage: EvaluateStage) -> WorkerGroup:
    r = stage.resources
    return WorkerGroup("resources", r.workers, r.cpus_per_worker, r.gpus_per_worker)


def _settings(stage: EvaluateStage) -> Dict[str, Any]:
    settings = asdict(stage)  # fingerprinted flat: the eval section's fields beside the stage's own
    return {**settings, **settings.pop("eval")}


def _fingerprint(ctx, name: str, stage: EvaluateStage) -> str:
    return fingerprint("evaluate", _settings(stage), ctx.dataset_digest(stage.data),
                       weights_identity(ctx, stage.checkpoint))


def _run(ctx, name: str, stage: EvaluateStage, fp: str):
    checkpoint, lineage = weights_source(ctx, stage.checkpoint)
    model = asdict(stage.model) if stage.model is not None else None  # None: what the checkpoint records
    r = stage.resources
    data_uri = ctx.spec.shards_uri(stage.data)
    lineage = {**lineage, "datasets": {**lineage.get("datasets", {}), stage.data: ctx.dataset_digest(stage.data)},
               "configs": {**lineage.get("configs", {}), name: fingerprint(_settings(stage))}}
    producers = [run for run in lineage.get("runs", {}).values() if run]
    tags = {"dino.pipeline": ctx.spec.name, "dino.stage": name, "dino.fingerprint": fp, "checkpoint": checkpoint,
            "data": stage.data, "git_commit": ctx.git_commit,
            **{f"parent_run.{s}": run for s, run in lineage.get("runs", {}).items() if run},
            **{f"data_digest.{d}": digest for d, digest in lineage["datasets"].items()}}
    if producers:
        tags["mlflow.parentRunId"] = producers[-1]  # shown nested under the run that trained the checkpoint
    log.info("stage %s: COCO evaluation of %s on %s", name, checkpoint, data_uri)
    evaluation = evaluate_checkpoint(checkpoint, data_uri, stage.eval, ctx.tracking_uri, ctx.spec.experiment,
                                     f"{name}-{fp[:10]}", tags, workers=r.workers, cpus_per_worker=r.cpus_per_worker,
                                     use_gpu=r.gpus_per_worker > 0, model=model, transform=stage.transform)
    stats = evaluation["metrics"]
    log.info("stage %s: AP %.4f AP50 %.4f (MLflow run %s)", name, stats["AP"], stats["AP50"], evaluation["run_id"])
    return {**evaluation, "data": stage.data, "lineage": lineage}, {"AP": stats["AP"], "AP50": stats["AP50"]}


def evaluate_checkpoint(checkpoint: str, data_uri: str, config: EvalConfig, tracking_uri: str, experiment: str,
                        run_name: str, tags: Dict[str, str], workers: int = 1, cpus_per_worker: float = 0.5,
                        use_gpu: bool = False, model: Optional[Dict[str, Any]] = None,
                        transform: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``run_evaluation`` logged as one MLflow run (``tags`` + the protocol's, the stats, ``coco_eval.json``); the
    evaluate stage's and the sweep's. ``{checkpoint, metrics (COCO stats), run_id, model, transform, protocol}``."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from dino_platform.evaluation.runner import run_evaluation

    result = run_evaluation(checkpoint, data_uri, config, num_workers=workers, model=model, transform=transform,
                            use_gpu=use_gpu, cpus_per_worker=cpus_per_worker)
    client = MlflowClient(tracking_uri)
    run = client.create_run(client.get_experiment_by_name(experiment).experiment_id, run_name=run_name,
                            tags={**tags, **protocol_tags(result["protocol"])})
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in result["stats"].items()])
    client.log_dict(run.info.run_id, result, "coco_eval.json")
    client.set_terminated(run.info.run_id)
    return {"checkpoint": checkpoint, "metrics": result["stats"], "run_id": run.info.run_id, "model": result["model"],
            "transform": result["transform"], "protocol": result["protocol"]}


def _outputs_exist(ctx, outputs: Dict[str, Any]) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run_id = outputs.get("run_id")
    return bool(run_id) and holds(lambda: MlflowClient(ctx.tracking_uri).get_run(run_id), MlflowException)


def _summary(out: Dict[str, Any]) -> str:
    return f"AP {out['metrics']['AP']:.4f}  AP50 {out['metrics']['AP50']:.4f}  (MLflow run {out['run_id']})"


KIND = StageKind("evaluate", EvaluateStage, ("checkpoint", "metrics"), _validate, _fingerprint, _run, _outputs_exist,
                 _summary, workers=_workers, datasets=lambda stage: [stage.data],
                 preflight=lambda spec, name, stage: check_source_exists(spec, f"stages.{name}.checkpoint",
                                                                         stage.checkpoint))
