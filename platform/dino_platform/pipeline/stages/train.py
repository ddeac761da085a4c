"""Stage kind ``train``: ``dino train`` (Ray Train + DeepSpeed) on the stage's config; a re-run with the
same config resumes from the run's last checkpoint."""
from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple

from dino_platform.errors import ConfigError, DataError, StorageError
from dino_platform.model.artifact import weights_location
from dino_platform.pipeline.context import check_source_exists, weights_identity, weights_source
from dino_platform.pipeline.kind import StageKind, WorkerGroup, holds
from dino_platform.pipeline.spec import PipelineSpec, SourceRef, class_maps
from dino_platform.pipeline.state import fingerprint
from dino_platform.pipeline.validation import validate_model
from dino_platform.run_state import latest_registered_checkpoint
from dino_platform.storage import resolve
from dino_platform.train.config import TrainConfig, validate
from dino_platform.typed_config import parse_section
from dino_platform.yaml_docs import deep_merge, did_you_mean

log = logging.getLogger("dino.pipeline")


@dataclass
class InitSpec(SourceRef):
    """First weights of a train stage and how to carry the class head across label spaces."""

    # name of a shipped class map (o365_to_coco: Objects365 ids -> COCO ids); unmapped classes start fresh
    class_map: Optional[str] = None
    strict: bool = True


@dataclass
class TrainStage:
    kind: str = "train"
    train_data: str = ""
    eval_data: Optional[str] = None
    init: Optional[InitSpec] = None
    # a `dino train` config (train/config.py): the same sections, field names and checks; the
    # pipeline fills in what it owns (_OWNED) and unset fields keep the official recipe
    config: Dict[str, Any] = field(default_factory=dict)

    # the keys of the pipeline dialect before 2026-12 -> where they went (a clear error, not a silent drop)
    MOVED: ClassVar[Dict[str, str]] = {
        "model": "config.model", "transform": "config.data.transform", "seed": "config.run.seed",
        "train_config": "config", "schedule": "config.optim (epochs, lr, ...) and config.scaling "
        "(batch_size_per_worker, accumulation_steps)", "resources": "config.scaling (num_workers, "
        "cpus_per_worker, use_gpu), config.deepspeed (zero_stage, precision) and config.run.max_failures"}


# where the pipeline puts data, runs and logs, and the weights a stage starts from
_OWNED = {"data": ("train_uri", "eval_uri"), "run": ("name", "storage_path"), "tracking": ("experiment", "tracking_uri"),
          "model": ("init_from", "init_class_map", "init_strict")}


def _validate(scope, name: str, stage: TrainStage) -> None:
    where = f"stages.{name}"
    scope.dataset(f"{where}.train_data", stage.train_data)
    if stage.eval_data is not None:
        scope.dataset(f"{where}.eval_data", stage.eval_data)
    if stage.init is not None:
        scope.source(f"{where}.init", stage.init, ("checkpoint",))
        if stage.init.class_map is not None and stage.init.class_map not in class_maps():
            raise ConfigError(f"{where}.init.class_map: {stage.init.class_map!r} is not a shipped class map"
                              f"{did_you_mean(stage.init.class_map, class_maps())}; "
                              f"one of {', '.join(class_maps())}")
    for section, keys in _OWNED.items():
        for key in keys:
            if key in (stage.config.get(section) or {}):
                raise ConfigError(f"{where}.config.{section}.{key}: set by the pipeline (from train_data, "
                                  "eval_data, init, output_root and tracking); remove it")
    validate_model(f"{where}.config.model", train_config(scope.spec, name).model)  # and all `dino train` checks


def train_config(spec: PipelineSpec, stage_name: str, run_name: str = "pending",
                 init_from: Optional[str] = None) -> TrainConfig:
    """The ``dino train`` config of train stage ``stage_name``: its ``config`` plus what the pipeline owns."""
    stage = spec.stages[stage_name]
    model: Dict[str, Any] = {}
    if stage.init is not None:
        # the real location is known once the upstream stage has run; validation needs a stand-in
        model["init_from"] = init_from or f"<output of {stage.init.stage or stage.init.uri or stage.init.model}>"
        model["init_strict"] = stage.init.strict
        if stage.init.class_map:
            model["init_class_map"] = class_maps()[stage.init.class_map]()
    owned = {"model": model,
             "data": {"train_uri": spec.shards_uri(stage.train_data),
                      "eval_uri": spec.shards_uri(stage.eval_data) if stage.eval_data else None},
             "run": {"name": run_name, "storage_path": spec.train_storage},
             "tracking": {"experiment": spec.experiment, "tracking_uri": spec.tracking_uri()}}
    where = f"stages.{stage_name}.config"
    try:
        cfg = parse_section(TrainConfig, deep_merge(stage.config, owned), where)
        validate(cfg)
    except ConfigError as exc:
        text = str(exc)
        raise ConfigError(text if text.startswith(("unknown field", where)) else f"{where}.{text}") from None
    return cfg


def _workers(spec: PipelineSpec, name: str, stage: TrainStage) -> WorkerGroup:
    scaling = train_config(spec, name).scaling
    # an elastic group must fit at its minimum size; it grows into whatever else there is
    return WorkerGroup("config.scaling", scaling.min_workers, scaling.cpus_per_worker, int(scaling.use_gpu),
                       streams_data=True)


def _preflight(spec: PipelineSpec, name: str, stage: TrainStage) -> None:
    if stage.init is not None:
        check_source_exists(spec, f"stages.{name}.init", stage.init)


def _train_identity(cfg_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The parts of a TrainConfig that decide the trained weights (not where they or the logs go)."""
    d = json.loads(json.dumps(cfg_dict))
    for key in ("name", "storage_path", "max_failures"):
        d["run"].pop(key, None)
    d.pop("tracking", None)
    d["model"].pop("init_from", None)
    return d


def _fingerprint(ctx, name: str, stage: TrainStage) -> str:
    identity = _train_identity(train_config(ctx.spec, name).to_dict())
    data = {"train": ctx.dataset_digest(stage.train_data),
            "eval": ctx.dataset_digest(stage.eval_data) if stage.eval_data else None}
    init = weights_identity(ctx, stage.init) if stage.init is not None else None
    return fingerprint("train", identity, data, init)


def _run(ctx, name: str, stage: TrainStage, fp: str):
    from dino_platform.train.trainer import run_training

    spec = ctx.spec
    lineage = {"runs": {}, "datasets": {}, "configs": {}}
    init_from = None
    if stage.init is not None:
        init_from, lineage = weights_source(ctx, stage.init)
    run_name = f"{name}-{fp[:10]}"  # a changed config or input trains afresh; the same one resumes
    cfg = train_config(spec, name, run_name=run_name, init_from=init_from)
    run_dir = resolve(spec.train_storage).child(run_name)
    resumed = latest_checkpoint(run_dir)
    if resumed is not None:
        log.info("stage %s: continuing %s from its last checkpoint %s (step %d)", name, run_dir.uri, *resumed)
    else:
        log.info("stage %s: training %s from %s", name, run_dir.uri, init_from or "the backbone's initialisation")
    outcome = run_training(cfg)
    if outcome.checkpoint is None:
        raise DataError(f"stage {name}: training finished without a checkpoint in {run_dir.uri}")
    checkpoint = run_dir.child(posixpath.basename(outcome.checkpoint.path.rstrip("/"))).uri
    config_hash = fingerprint(_train_identity(cfg.to_dict()))
    lineage = {"runs": {**lineage["runs"], name: outcome.tracking.run_id if outcome.tracking else None},
               "datasets": {**lineage["datasets"], **{d: ctx.dataset_digest(d) for d in _datasets(stage)}},
               "configs": {**lineage["configs"], name: config_hash}}
    metrics = outcome.metrics or {}
    outputs = {"checkpoint": checkpoint, "run_dir": run_dir.uri, "run_id": lineage["runs"][name],
               "step": metrics.get("step"), "config_hash": config_hash, "lineage": lineage,
               # worker-group restarts (lost workers or nodes) and resizes of an elastic group
               "restarts": outcome.restarts, "resizes": outcome.resizes,
               "world_sizes": [g["world_size"] for g in outcome.worker_groups]}
    details = {"action": "resumed", "resumed_from_step": resumed[1], "resumed_from": resumed[0]} if resumed else {}
    return outputs, {**details, "checkpoint": checkpoint, "step": metrics.get("step")}


def latest_checkpoint(run_dir) -> Optional[Tuple[str, int]]:
    """(checkpoint dir name, step) Ray Train will resume ``run_dir`` from, or None for a fresh run."""
    latest = latest_registered_checkpoint(run_dir)
    if latest is None:
        return None
    return latest["checkpoint_dir_name"], int((latest.get("metrics") or {}).get("step", 0))


def _outputs_exist(ctx, outputs: Dict[str, Any]) -> bool:
    return holds(lambda: weights_location(outputs["checkpoint"]), StorageError, KeyError)


def _summary(out: Dict[str, Any]) -> str:
    restarts = ""
    if out.get("restarts"):
        sizes = " -> ".join(map(str, out.get("world_sizes") or []))
        restarts = f"  ({out['restarts']} restarts, {out.get('resizes', 0)} resizes: workers {sizes})"
    return f"{out['checkpoint']}{restarts}"


def _datasets(stage: TrainStage) -> List[str]:
    return [d for d in (stage.train_data, stage.eval_data) if d]


KIND = StageKind("train", TrainStage, ("checkpoint",), _validate, _fingerprint, _run, _outputs_exist, _summary,
                 preflight=_preflight, workers=_workers, datasets=_datasets)
