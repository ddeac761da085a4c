"""The pipeline spec: datasets, stages in the order they run, presets; typed and validated once.

A spec is a YAML file (``pipelines/*.yaml``)::

    name: o365_pretrain_coco_ft
    output_root: s3://bucket/pipelines/o365_pretrain_coco_ft   # state file, shards, checkpoints
    datasets:
      coco_val: {format: coco, annotations: s3://bucket/raw/instances_val2017.json, images: s3://bucket/raw/val2017}
    stages:                       # run in the order written
      ingest:   {kind: ingest, datasets: [coco_val]}
      finetune: {kind: train, train_data: coco_val, model: {preset: dino_r50_4scale, num_classes: 91},
                 init: {uri: s3://bucket/checkpoint0011_4scale.pth}, resources: {workers: 8, gpus_per_worker: 1}}
      evaluate: {kind: evaluate, checkpoint: {stage: finetune}, data: coco_val}
      register: {kind: register, evaluation: evaluate, model_name: dino-coco}
    presets:
      smoke: {...}                # deep-merged over the spec by --preset smoke

Stages read earlier stages' outputs by name (``{stage: finetune}``); datasets by name. Everything
that can be checked without storage or a cluster is checked here, and every error names the
field (``stages.finetune.schedule.lrr: unknown field ...; did you mean stages.finetune.schedule.lr?``).
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple, Union

from dino_platform.errors import ConfigError
from dino_platform.storage import output_root as storage_output_root
from dino_platform.train.config import TrainConfig, parse_section
from dino_platform.yaml_docs import apply_override, apply_preset, did_you_mean, read_mapping

STAGE_KINDS = ("ingest", "train", "evaluate", "register", "predict", "infer")
# what each kind of stage produces; other stages read these by name
STAGE_OUTPUTS: Dict[str, Tuple[str, ...]] = {
    "ingest": ("shards",),
    "train": ("checkpoint",),
    "evaluate": ("checkpoint", "metrics"),
    "register": ("model",),
    "predict": ("images",),
    "infer": ("detections",),
}
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_TOP_LEVEL = ("name", "description", "output_root", "ray", "tracking", "datasets", "stages", "presets")


def class_maps() -> Dict[str, Callable[[], Dict[int, int]]]:
    """Shipped class maps by name: {checkpoint class id: model class id}."""
    from dino_platform.data.categories import o365_to_coco_ids

    return {"o365_to_coco": o365_to_coco_ids}


# ---------------------------------------------------------------------------------------------
# the typed spec


@dataclass
class SynthSpec:
    """Raw data made by ``dino synth`` (demos and tests) instead of annotation/image URIs."""

    kind: Literal["o365", "coco"] = "coco"
    images: int = 32
    seed: int = 0
    size: List[int] = field(default_factory=lambda: [320, 240])  # nominal (width, height)


@dataclass
class DatasetSpec:
    """One dataset: where its raw form is (to ingest) and where its shards are (or go)."""

    format: Literal["coco", "o365"] = "coco"
    annotations: Optional[str] = None  # COCO-style JSON URI
    images: Optional[str] = None  # image folder URI
    synth: Optional[SynthSpec] = None  # or: generate the raw data
    shards: Optional[str] = None  # default <output_root>/shards/<name>; alone = already ingested
    shard_size: int = 512

    @property
    def has_raw_source(self) -> bool:
        return self.synth is not None or self.annotations is not None


@dataclass
class SourceRef:
    """Where weights come from: an earlier stage's output, a URI, or a registered model."""

    stage: Optional[str] = None  # e.g. finetune (reads its checkpoint)
    uri: Optional[str] = None  # checkpoint dir, model.pt, or an official DINO .pth (local or s3://)
    model: Optional[str] = None  # models:/dino-coco@champion or models:/dino-coco/3


@dataclass
class InitSpec:
    """First weights of a train stage and how to carry the class head across label spaces."""

    stage: Optional[str] = None
    uri: Optional[str] = None
    model: Optional[str] = None
    # name of a shipped class map (o365_to_coco: Objects365 ids -> COCO ids); unmapped classes start fresh
    class_map: Optional[str] = None
    strict: bool = True

    def source(self) -> SourceRef:
        return SourceRef(stage=self.stage, uri=self.uri, model=self.model)


@dataclass
class ModelSpec:
    preset: str = "dino_tiny"
    num_classes: int = 91  # max category id + 1 (COCO: 91, Objects365: 366)
    overrides: Dict[str, Any] = field(default_factory=dict)  # dino_core DinoConfig fields


@dataclass
class ScheduleSpec:
    """Optimisation schedule; unset fields keep the official recipe (see ``train/config.py``)."""

    epochs: Optional[int] = None
    lr_drop: Optional[int] = None
    lr: Optional[float] = None
    lr_backbone: Optional[float] = None
    weight_decay: Optional[float] = None
    clip_max_norm: Optional[float] = None
    max_steps: Optional[int] = None
    batch_size_per_worker: Optional[int] = None
    accumulation_steps: Optional[int] = None


@dataclass
class ResourcesSpec:
    """Ray Train workers of a stage; unset fields keep ``dino train``'s defaults."""

    workers: Optional[Union[int, List[int]]] = None  # or [min, max]: an elastic group (train stages)
    placement_strategy: Optional[Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]] = None
    cpus_per_worker: Optional[float] = None
    gpus_per_worker: int = 0  # 0 (CPU) or 1 (one process per GPU)
    zero_stage: Optional[Literal[0, 1, 2, 3]] = None
    precision: Optional[Literal["fp32", "bf16", "fp16"]] = None
    max_failures: Optional[int] = None  # worker-group restarts from the last checkpoint


@dataclass
class IngestStage:
    kind: str = "ingest"
    datasets: List[str] = field(default_factory=list)
    parallel: bool = True  # shards built as Ray tasks


@dataclass
class TrainStage:
    kind: str = "train"
    train_data: str = ""
    eval_data: Optional[str] = None
    model: ModelSpec = field(default_factory=ModelSpec)
    init: Optional[InitSpec] = None
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    transform: Dict[str, Any] = field(default_factory=dict)  # data.transform of `dino train`
    seed: int = 42
    # further `dino train` config sections (eval, checkpoint, ...), merged over the above
    train_config: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluateStage:
    kind: str = "evaluate"
    checkpoint: SourceRef = field(default_factory=SourceRef)
    data: str = ""
    # needed only for weights that do not record their model (official .pth files)
    model: Optional[ModelSpec] = None
    transform: Optional[Dict[str, Any]] = None
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    batch_size: int = 2
    # the COCO AP protocol, as in `dino train`'s eval section (evaluation.coco_eval.EvalProtocol):
    # null = official DINO (all num_select detections), 100 = COCO-challenge top 100 per image
    detections_per_image: Optional[int] = None
    max_dets: int = 100
    engine: str = "faster_coco_eval"


@dataclass
class RegisterStage:
    kind: str = "register"
    evaluation: str = ""  # an earlier evaluate stage: only evaluated checkpoints are registered
    model_name: str = "dino-coco"
    alias: str = "champion"  # moves to a new version only when its AP beats the alias holder's
    export: List[Literal["onnx"]] = field(default_factory=list)  # exports logged beside the weights (model/model.onnx)


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


Stage = Union[IngestStage, TrainStage, EvaluateStage, RegisterStage, PredictStage, InferStage]
STAGE_CLASSES = {"ingest": IngestStage, "train": TrainStage, "evaluate": EvaluateStage,
                 "register": RegisterStage, "predict": PredictStage, "infer": InferStage}


@dataclass
class RaySpec:
    # None: the cluster of the Ray job this runs in (RAY_ADDRESS), else a fresh local instance
    address: Optional[str] = None
    num_cpus: Optional[int] = None  # CPUs of a fresh local instance (None: all of this machine)


@dataclass
class TrackingSpec:
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<output_root>/mlflow.db (local output roots only)
    uri: Optional[str] = None
    experiment: Optional[str] = None  # default: the pipeline name


@dataclass
class PipelineSpec:
    name: str
    output_root: str
    datasets: Dict[str, DatasetSpec]
    stages: Dict[str, Stage]  # in run order
    ray: RaySpec = field(default_factory=RaySpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    description: str = ""
    source: str = ""  # the file it came from
    preset: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)  # resolved mapping (presets applied)

    # --- derived locations ---------------------------------------------------------------------
    def shards_uri(self, dataset: str) -> str:
        ds = self.datasets[dataset]
        return ds.shards or _join(self.output_root, f"shards/{dataset}")

    def raw_uri(self, dataset: str) -> str:
        """Where synthetic raw data is generated (synth datasets only)."""
        return _join(self.output_root, f"raw/{dataset}")

    def annotations_uri(self, dataset: str) -> str:
        ds = self.datasets[dataset]
        return f"{self.raw_uri(dataset)}/annotations.json" if ds.synth else ds.annotations

    def images_uri(self, dataset: str) -> str:
        ds = self.datasets[dataset]
        return f"{self.raw_uri(dataset)}/images" if ds.synth else ds.images

    @property
    def state_uri(self) -> str:
        return _join(self.output_root, "pipeline_state.json")

    @property
    def train_storage(self) -> str:
        return _join(self.output_root, "train")

    @property
    def output_is_local(self) -> bool:
        return "://" not in self.output_root or self.output_root.startswith("file://")

    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        from dino_platform.storage import resolve

        return f"sqlite:///{resolve(self.output_root).path}/mlflow.db"

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    def train_config(self, stage_name: str, run_name: str = "pending", init_from: Optional[str] = None) -> TrainConfig:
        """The ``dino train`` config of train stage ``stage_name`` (validated by train.config)."""
        from dino_platform.pipeline.validation import train_config

        return train_config(self, stage_name, run_name, init_from)


def _join(root: str, relative: str) -> str:
    return f"{root.rstrip('/')}/{relative}"


# ---------------------------------------------------------------------------------------------
# loading: YAML -> presets -> --set overrides -> typed spec -> cross-checks


def load_spec(source: Union[str, Path, Dict[str, Any]], preset: Optional[str] = None,
              overrides: Optional[List[str]] = None) -> PipelineSpec:
    """Read a spec, apply ``preset`` and ``key.path=value`` overrides, build and validate it.

    Raises ConfigError naming the file and the field for anything wrong.
    """
    raw, origin = read_mapping(source, "pipeline spec", "name, output_root, datasets, stages")
    try:
        raw = apply_preset(raw, preset)
        for item in overrides or []:
            apply_override(raw, item, "stages.pretrain.schedule.max_steps=100")
        spec = _build_spec(raw)
        spec.source, spec.preset = origin, preset
        from dino_platform.pipeline.validation import validate_spec

        validate_spec(spec)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    return spec


def _build_spec(raw: Dict[str, Any]) -> PipelineSpec:
    unknown = sorted(set(raw) - set(_TOP_LEVEL))
    if unknown:
        raise ConfigError(f"unknown field {unknown[0]}{did_you_mean(unknown[0], _TOP_LEVEL)}; "
                          f"allowed: {', '.join(_TOP_LEVEL)}")
    for name in ("name", "output_root"):
        if not isinstance(raw.get(name), str) or not raw[name]:
            raise ConfigError(f"{name}: required (a string)")
    datasets_raw = raw.get("datasets") or {}
    stages_raw = raw.get("stages") or {}
    for section, value in (("datasets", datasets_raw), ("stages", stages_raw)):
        if not isinstance(value, dict) or not value:
            raise ConfigError(f"{section}: a non-empty mapping of name -> {section[:-1]} is required")
    datasets = {}
    for name, value in datasets_raw.items():
        _check_name("datasets", name)
        datasets[name] = parse_section(DatasetSpec, value if value is not None else {}, f"datasets.{name}")
    stages = {}
    for name, value in stages_raw.items():
        _check_name("stages", name)
        stages[name] = _build_stage(name, value)
    # local: absolute from here on (Ray workers have other working dirs); relative in a submitted
    # job: under $DINO_HOME, not in Ray's temporary copy of the working dir
    output_root = storage_output_root(raw["output_root"])
    return PipelineSpec(
        name=raw["name"], output_root=output_root, datasets=datasets, stages=stages,
        ray=parse_section(RaySpec, raw.get("ray") or {}, "ray"),
        tracking=parse_section(TrackingSpec, raw.get("tracking") or {}, "tracking"),
        description=str(raw.get("description") or ""), raw=raw,
    )


def _check_name(section: str, name: Any) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError(f"{section}.{name}: names are letters, digits, '_' and '-', starting with a letter")


def _build_stage(name: str, value: Any) -> Stage:
    where = f"stages.{name}"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping with kind: one of {', '.join(STAGE_KINDS)}")
    kind = value.get("kind", name if name in STAGE_KINDS else None)
    if kind is None:
        raise ConfigError(f"{where}.kind: required; one of {', '.join(STAGE_KINDS)}")
    if kind not in STAGE_CLASSES:
        raise ConfigError(f"{where}.kind: {kind!r} is not a stage kind{did_you_mean(kind, STAGE_KINDS)}; "
                          f"one of {', '.join(STAGE_KINDS)}")
    return parse_section(STAGE_CLASSES[kind], {**value, "kind": kind}, where)




def stage_config_dict(stage: Stage) -> Dict[str, Any]:
    """The stage's declaration as plain data (for fingerprints and logs)."""
    return dataclasses.asdict(stage)
