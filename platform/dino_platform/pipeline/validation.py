"""Cross-field checks of a pipeline spec (no storage, no cluster), and each train stage's ``dino train`` config.

Runs inside ``load_spec``: a typo'd dataset or stage name, a stage reading an output no earlier
stage produces, an unknown preset or class map, an impossible `dino train` setting all fail here,
before anything starts. Checks that need storage or the cluster live in ``preflight``.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional, Tuple

from dino_platform.errors import ConfigError
from dino_platform.evaluation.coco_eval import EvalProtocol
from dino_platform.pipeline.spec import (NAME_PATTERN, STAGE_OUTPUTS, DatasetSpec, EvaluateStage, IngestStage,
                                         InferStage, ModelSpec, PipelineSpec, PredictStage, RegisterStage, ResourcesSpec,
                                         SourceRef, TrainStage, class_maps)
from dino_platform.train.config import TrainConfig, load_config
from dino_platform.yaml_docs import deep_merge, did_you_mean

_MODEL_URI = re.compile(r"^models:/[^/@]+(@[A-Za-z0-9_-]+|/\d+)$")


def validate_spec(spec: PipelineSpec) -> None:
    if not NAME_PATTERN.match(spec.name):
        raise ConfigError(f"name: {spec.name!r} must be letters, digits, '_' and '-'")
    if spec.ray.num_cpus is not None and spec.ray.num_cpus < 1:
        raise ConfigError(f"ray.num_cpus: {spec.ray.num_cpus} must be >= 1")
    if not spec.output_is_local and not (spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise ConfigError(f"tracking.uri: required when output_root ({spec.output_root}) is not local: every "
                          "node must reach the tracking store (an MLflow server, e.g. http://mlflow:5000, "
                          "or $MLFLOW_TRACKING_URI)")
    for name, ds in spec.datasets.items():
        _validate_dataset(name, ds)
    ingested: set = set()
    earlier: Dict[str, str] = {}  # stage name -> kind, in order
    for name, stage in spec.stages.items():
        where = f"stages.{name}"
        if isinstance(stage, IngestStage):
            if not stage.datasets:
                raise ConfigError(f"{where}.datasets: list the datasets to ingest")
            for i, ds in enumerate(stage.datasets):
                _dataset_ref(spec, f"{where}.datasets[{i}]", ds, ingested=None)
                if not spec.datasets[ds].has_raw_source:
                    raise ConfigError(f"{where}.datasets[{i}]: dataset {ds} has nothing to ingest from; give "
                                      f"datasets.{ds}.annotations + images, or datasets.{ds}.synth")
            ingested.update(stage.datasets)
        elif isinstance(stage, TrainStage):
            _dataset_ref(spec, f"{where}.train_data", stage.train_data, ingested)
            if stage.eval_data is not None:
                _dataset_ref(spec, f"{where}.eval_data", stage.eval_data, ingested)
            if stage.init is not None:
                _source_ref(f"{where}.init", stage.init.source(), earlier, ("checkpoint",))
                if stage.init.class_map is not None and stage.init.class_map not in class_maps():
                    raise ConfigError(f"{where}.init.class_map: {stage.init.class_map!r} is not a shipped class map"
                                      f"{did_you_mean(stage.init.class_map, class_maps())}; "
                                      f"one of {', '.join(class_maps())}")
            _validate_model(f"{where}.model", stage.model)
            _validate_resources(f"{where}.resources", stage.resources, elastic=True)
            train_config(spec, name, "pending", None)  # everything `dino train` checks
        elif isinstance(stage, EvaluateStage):
            _source_ref(f"{where}.checkpoint", stage.checkpoint, earlier, ("checkpoint",))
            _dataset_ref(spec, f"{where}.data", stage.data, ingested)
            if stage.model is not None:
                _validate_model(f"{where}.model", stage.model)
            _validate_resources(f"{where}.resources", stage.resources)
            if stage.batch_size < 1:
                raise ConfigError(f"{where}.batch_size: must be >= 1")
            try:
                EvalProtocol(detections_per_image=stage.detections_per_image, max_dets=stage.max_dets,
                             engine=stage.engine)
            except ValueError as exc:
                raise ConfigError(f"{where}.{exc}") from None
        elif isinstance(stage, RegisterStage):
            if earlier.get(stage.evaluation) != "evaluate":
                _missing_stage(f"{where}.evaluation", stage.evaluation, earlier, "evaluate", ("metrics",))
            if not stage.model_name or "/" in stage.model_name or "@" in stage.model_name:
                raise ConfigError(f"{where}.model_name: {stage.model_name!r} must be non-empty, without '/' or '@'")
            if not NAME_PATTERN.match(stage.alias) or stage.alias == "latest" or re.fullmatch(r"[vV]\d+", stage.alias):
                raise ConfigError(f"{where}.alias: {stage.alias!r} must be a name like champion "
                                  "(not 'latest' or v<number>, which MLflow reserves)")
        elif isinstance(stage, PredictStage):
            _source_ref(f"{where}.model", stage.model, earlier, ("model", "checkpoint"))
            if bool(stage.images) == (stage.dataset is not None):
                raise ConfigError(f"{where}: give either images (a list of URIs) or dataset (+ limit)")
            if stage.dataset is not None:
                _dataset_ref(spec, f"{where}.dataset", stage.dataset, ingested)
            if stage.limit < 1:
                raise ConfigError(f"{where}.limit: {stage.limit} must be >= 1")
            if stage.max_drawn is not None and stage.max_drawn < 1:
                raise ConfigError(f"{where}.max_drawn: {stage.max_drawn} must be >= 1")
            if not 0.0 <= stage.threshold <= 1.0:
                raise ConfigError(f"{where}.threshold: {stage.threshold} must be in [0, 1]")
        elif isinstance(stage, InferStage):
            _source_ref(f"{where}.model", stage.model, earlier, ("model", "checkpoint"))
            if (stage.images is None) == (stage.dataset is None):
                raise ConfigError(f"{where}: give either images (a prefix of image files) or dataset")
            if stage.dataset is not None:
                _dataset_ref(spec, f"{where}.dataset", stage.dataset, ingested)
            from dino_platform.infer.job import InferConfig

            InferConfig(model="-", out="-", images=stage.images or "-", threshold=stage.threshold,
                        concurrency=stage.concurrency, batch_size=stage.batch_size, part_size=stage.part_size,
                        cpus_per_actor=stage.cpus_per_actor).validate_fields(where)
        earlier[name] = stage.kind


def _validate_dataset(name: str, ds: DatasetSpec) -> None:
    where = f"datasets.{name}"
    if (ds.annotations is None) != (ds.images is None):
        missing = "images" if ds.images is None else "annotations"
        raise ConfigError(f"{where}.{missing}: required together with "
                          f"{'annotations' if missing == 'images' else 'images'}")
    if ds.synth is not None and ds.annotations is not None:
        raise ConfigError(f"{where}: give either synth or annotations + images, not both")
    if not ds.has_raw_source and not ds.shards:
        raise ConfigError(f"{where}: no data; give annotations + images (raw COCO-style data to ingest), "
                          "synth (generated), or shards (the URI of an existing `dino ingest` output)")
    if ds.synth is not None:
        if ds.synth.kind != ds.format:
            raise ConfigError(f"{where}.synth.kind: {ds.synth.kind!r} differs from {where}.format {ds.format!r}")
        if ds.synth.images < 1 or len(ds.synth.size) != 2 or min(ds.synth.size) < 64:
            raise ConfigError(f"{where}.synth: images >= 1 and size [width, height] of at least 64 each")
    if ds.shard_size < 1:
        raise ConfigError(f"{where}.shard_size: {ds.shard_size} must be >= 1")


def _dataset_ref(spec: PipelineSpec, where: str, name: str, ingested: Optional[set]) -> None:
    if not name:
        raise ConfigError(f"{where}: name a dataset (one of {', '.join(spec.datasets)})")
    if name not in spec.datasets:
        raise ConfigError(f"{where}: no dataset named {name!r}{did_you_mean(name, spec.datasets)}; "
                          f"datasets: {', '.join(spec.datasets)}")
    if ingested is not None and spec.datasets[name].has_raw_source and name not in ingested:
        raise ConfigError(f"{where}: dataset {name} is raw data that no earlier ingest stage lists; add it to "
                          f"an ingest stage before this one, or point datasets.{name}.shards at an existing "
                          "ingest (and drop its annotations/images/synth)")


def _source_ref(where: str, ref: SourceRef, earlier: Dict[str, str], outputs: Tuple[str, ...]) -> None:
    given = [k for k in ("stage", "uri", "model") if getattr(ref, k)]
    if len(given) != 1:
        raise ConfigError(f"{where}: give exactly one of stage (an earlier stage's output), uri or model "
                          f"(models:/name@alias), got {', '.join(given) or 'none'}")
    if ref.model is not None and not _MODEL_URI.match(ref.model):
        raise ConfigError(f"{where}.model: {ref.model!r} is not a registry URI like models:/dino-coco@champion "
                          "or models:/dino-coco/3")
    if ref.stage is not None:
        kind = earlier.get(ref.stage)
        if kind is None or not set(STAGE_OUTPUTS[kind]) & set(outputs):
            _missing_stage(f"{where}.stage", ref.stage, earlier, None, outputs)


def _missing_stage(where: str, name: str, earlier: Dict[str, str], kind: Optional[str], outputs: Tuple[str, ...]) -> None:
    wanted = " or ".join(outputs)
    producers = [n for n, k in earlier.items()
                 if (kind is None or k == kind) and set(outputs) & set(STAGE_OUTPUTS[k])]
    if name in earlier:
        raise ConfigError(f"{where}: reads {wanted} from {name!r}, but {name} is a {earlier[name]} stage, which "
                          f"produces {', '.join(STAGE_OUTPUTS[earlier[name]])}; earlier stages producing "
                          f"{wanted}: {', '.join(producers) or 'none'}")
    raise ConfigError(f"{where}: reads {wanted} from {name!r}, but no earlier stage is named so"
                      f"{did_you_mean(name, earlier)}; earlier stages producing {wanted}: "
                      f"{', '.join(producers) or 'none'} (stages run in the order written)")


def _validate_model(where: str, model: ModelSpec) -> None:
    import dino_core

    if model.preset not in dino_core.PRESETS:
        raise ConfigError(f"{where}.preset: {model.preset!r} is not a dino_core preset"
                          f"{did_you_mean(model.preset, dino_core.PRESETS)}; one of {', '.join(dino_core.PRESETS)}")
    try:
        dino_core.get_config(model.preset, **model.overrides)
    except ValueError as exc:
        raise ConfigError(f"{where}.overrides: {exc}") from None
    if model.num_classes < 1:
        raise ConfigError(f"{where}.num_classes: {model.num_classes} must be >= 1 (max category id + 1)")


def _validate_resources(where: str, res: ResourcesSpec, elastic: bool = False) -> None:
    if res.gpus_per_worker not in (0, 1):
        raise ConfigError(f"{where}.gpus_per_worker: {res.gpus_per_worker} must be 0 or 1 (one worker process "
                          "per GPU; use more workers for more GPUs)")
    if isinstance(res.workers, list):
        if not elastic:
            raise ConfigError(f"{where}.workers: {res.workers}: a [min, max] range is for train stages; "
                              "an evaluation runs at one size, give an integer")
        # train stages: the range is checked as the `dino train` config's scaling.num_workers
    elif res.workers is not None and res.workers < 1:
        raise ConfigError(f"{where}.workers: {res.workers} must be >= 1")
    if res.cpus_per_worker is not None and res.cpus_per_worker <= 0:
        raise ConfigError(f"{where}.cpus_per_worker: {res.cpus_per_worker} must be > 0")


# ---------------------------------------------------------------------------------------------
# the `dino train` config of a train stage


def train_config(spec: PipelineSpec, stage_name: str, run_name: str, init_from: Optional[str]) -> TrainConfig:
    stage = spec.stages[stage_name]
    assert isinstance(stage, TrainStage)
    s, r = stage.schedule, stage.resources

    def given(**values):
        return {k: v for k, v in values.items() if v is not None}

    model: Dict[str, Any] = {"preset": stage.model.preset, "num_classes": stage.model.num_classes,
                             "overrides": dict(stage.model.overrides)}
    if stage.init is not None:
        # the real location is known once the upstream stage has run; validation needs a stand-in
        model["init_from"] = init_from or f"<output of {stage.init.stage or stage.init.uri or stage.init.model}>"
        model["init_strict"] = stage.init.strict
        if stage.init.class_map:
            model["init_class_map"] = class_maps()[stage.init.class_map]()
    raw = {
        "model": model,
        "optim": given(epochs=s.epochs, lr_drop=s.lr_drop, lr=s.lr, lr_backbone=s.lr_backbone,
                       weight_decay=s.weight_decay, clip_max_norm=s.clip_max_norm, max_steps=s.max_steps),
        "scaling": given(num_workers=r.workers, placement_strategy=r.placement_strategy, cpus_per_worker=r.cpus_per_worker, use_gpu=r.gpus_per_worker > 0,
                         batch_size_per_worker=s.batch_size_per_worker, accumulation_steps=s.accumulation_steps),
        "deepspeed": given(zero_stage=r.zero_stage, precision=r.precision),
        "data": {"train_uri": spec.shards_uri(stage.train_data),
                 "eval_uri": spec.shards_uri(stage.eval_data) if stage.eval_data else None,
                 "transform": dict(stage.transform)},
        "run": given(name=run_name, storage_path=spec.train_storage, seed=stage.seed, max_failures=r.max_failures),
        "tracking": {"experiment": spec.experiment, "tracking_uri": spec.tracking_uri()},
    }
    raw = deep_merge(raw, stage.train_config)
    try:
        return load_config(raw)
    except ConfigError as exc:
        text = str(exc)
        text = text[len("config: "):] if text.startswith("config: ") else text
        raise ConfigError(f"stages.{stage_name} (as a `dino train` config): {text}") from None
