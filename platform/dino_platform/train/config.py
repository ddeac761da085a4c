"""The training job's configuration: one typed object, loaded from YAML and validated once.

Defaults follow the official DINO recipe (``config/DINO/DINO_4scale.py`` and ``main.py``): AdamW with
lr 1e-4, backbone lr 1e-5, weight decay 1e-4, gradient clipping 0.1 and a step decay at ``lr_drop``.
Every error names the dotted field (``optim.lr``) and what would be accepted.

Example (``dino train job.yaml``)::

    run: {name: coco-ft, storage_path: s3://bucket/runs}
    data: {train_uri: s3://bucket/shards/train, eval_uri: s3://bucket/shards/val}
    scaling: {num_workers: 2, batch_size_per_worker: 2}
    deepspeed: {zero_stage: 2, precision: bf16}
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import yaml

from dino_platform.errors import ConfigError
from dino_platform.evaluation.coco_eval import EvalConfig
from dino_platform.model.config import ModelConfig
from dino_platform.typed_config import parse_section
from dino_platform.yaml_docs import apply_override, read_mapping

@dataclass
class OptimConfig:
    """AdamW and its schedule; ``epochs`` and ``lr_drop`` count passes over the training set."""

    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    # NOTE: the official configs carry lr_linear_proj_mult=0.1 but their default param-dict type
    # ignores it; set scale_linear_proj_lr to apply it to sampling_offsets/reference_points.
    lr_linear_proj_mult: float = 0.1
    scale_linear_proj_lr: bool = False
    clip_max_norm: float = 0.1
    epochs: int = 12
    lr_drop: int = 11
    lr_drop_factor: float = 0.1
    # stop after this many optimizer steps (smoke runs, staged runs); the schedule is unchanged
    max_steps: Optional[int] = None


@dataclass
class ScalingConfig:
    """Ray Train workers; the total batch is batch_size_per_worker x num_workers x accumulation_steps.

    ``num_workers: [min, max]`` makes the worker group elastic: Ray Train starts it at the largest
    size in the range the cluster can hold, restarts it smaller from the latest checkpoint when a
    node is lost, and grows it back when capacity returns. With ``keep_total_batch`` (the default
    for a range) the total batch is the one at ``max`` workers and the accumulation steps follow the
    world size: ``w x batch_size_per_worker x accumulation(w)`` is the same total at every size.
    """

    # an int: a fixed-size group; [min, max]: elastic
    num_workers: Union[int, List[int]] = 2
    use_gpu: bool = False
    # fractional CPUs let Ray Data's readers run beside the workers on small machines
    cpus_per_worker: float = 0.5
    batch_size_per_worker: int = 2
    # at max workers when keep_total_batch; recomputed for every other world size
    accumulation_steps: int = 1
    # how Ray places the workers' bundles: PACK fills nodes, STRICT_SPREAD one worker per node
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # None: true for a [min, max] range, false for a fixed size
    keep_total_batch: Optional[bool] = None
    # custom Ray resources each worker also asks for, e.g. {train_slot: 1} on GPU node types
    resources_per_worker: Dict[str, float] = field(default_factory=dict)
    # elastic: seconds between Ray Train's checks whether the group can grow
    resize_check_interval_s: float = 60.0

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.elastic else self.num_workers

    @property
    def keeps_total_batch(self) -> bool:
        return self.elastic if self.keep_total_batch is None else self.keep_total_batch

    def accumulation_for(self, world_size: int) -> int:
        """Accumulation steps at ``world_size`` workers (ConfigError when the total cannot be kept)."""
        if not self.keeps_total_batch or world_size == self.max_workers:
            return self.accumulation_steps
        total = self.batch_size_per_worker * self.max_workers * self.accumulation_steps
        per_step = world_size * self.batch_size_per_worker
        if total % per_step:
            raise ConfigError(
                f"scaling.keep_total_batch: the total batch {total} (batch_size_per_worker "
                f"{self.batch_size_per_worker} x {self.max_workers} workers x accumulation_steps "
                f"{self.accumulation_steps}) is not a multiple of {world_size} workers x batch "
                f"{self.batch_size_per_worker} = {per_step}; choose num_workers whose every size in "
                f"{self.num_workers} divides it, or set keep_total_batch: false")
        return total // per_step


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    # bf16/fp16: autocast over the forward with fp32 master parameters (docs/train.md, "Precision")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # fp32 on an Ampere or newer GPU: matmuls and convolutions in TF32 (10-bit mantissa inputs,
    # fp32 accumulation), as most detection codebases train; false keeps full fp32 arithmetic
    tf32: bool = True
    # elements per ZeRO-1/2 gradient-reduce and all-gather bucket; DeepSpeed's 5e8 would allocate
    # ~4 GB of buffers per GPU for DINO's ~50M parameters with overlap_comm
    bucket_size: int = 50_000_000


@dataclass
class DataConfig:
    """Shard URIs produced by ``dino ingest`` and the image transform (see ``data.streaming``)."""

    train_uri: str = ""
    eval_uri: Optional[str] = None
    # forwarded to dino_platform.data.streaming (e.g. {max_size: 256}); validated there
    transform: Dict[str, Any] = field(default_factory=dict)
    # a sample whose decode/transform fails: "fail" stops the run with the sample named; "skip"
    # leaves it out, counts it (metric data/skipped_samples) and lists it (artifact sample_errors.json)
    on_sample_error: Literal["fail", "skip"] = "fail"


@dataclass(frozen=True)
class TrainEvalConfig(EvalConfig):
    """``eval``: the COCO evaluation (``EvalConfig``: batch_size, detections_per_image, max_dets,
    engine) plus when training evaluates and what it logs."""

    every_n_epochs: Optional[int] = 1
    # validation images drawn with their predicted boxes and logged to MLflow
    num_logged_images: int = 4
    logged_score_threshold: float = 0.3

    def __post_init__(self):
        super().__post_init__()
        if self.every_n_epochs is not None and self.every_n_epochs < 1:
            raise ConfigError(f"every_n_epochs: {self.every_n_epochs} must be >= 1 (or null: only at the end)")
        if self.num_logged_images < 0:
            raise ConfigError(f"num_logged_images: {self.num_logged_images} must be >= 0")


@dataclass
class CheckpointConfig:
    every_n_steps: Optional[int] = None
    every_n_epochs: Optional[int] = 1
    # checkpoints kept in storage (oldest removed first); None keeps all
    num_to_keep: Optional[int] = 2


@dataclass
class RunConfig:
    name: str = "dino"
    # local directory or s3://bucket/prefix; the run lives at <storage_path>/<name>
    storage_path: str = "./runs"
    # restarts of the worker group from the latest checkpoint after a worker dies
    max_failures: int = 0
    seed: int = 42
    # seconds without a completed optimizer step, batch or phase change before the stall watchdog
    # reports where the job waits and fails the attempt (see docs/train.md, "Stall watchdog").
    # None: the larger of 600 s and 20 measured step times. Also the collectives' timeout.
    stall_timeout_s: Optional[float] = None


@dataclass
class TrackingConfig:
    experiment: str = "dino"
    # None: $MLFLOW_TRACKING_URI, else a SQLite file under the run directory
    tracking_uri: Optional[str] = None
    enabled: bool = True
    # progress (loss terms, lr, throughput) is reported every this many optimizer steps
    log_every_n_steps: int = 10


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def total_batch_size(self) -> int:
        """Images per optimizer step (at max workers for an elastic group)."""
        s = self.scaling
        return s.batch_size_per_worker * s.max_workers * s.accumulation_steps

    def at_world_size(self, world_size: int) -> "TrainConfig":
        """This config as a worker group of ``world_size`` runs it: a fixed num_workers and the
        accumulation steps that keep the total batch (``scaling.keep_total_batch``)."""
        scaling = dataclasses.replace(self.scaling, num_workers=world_size,
                                      accumulation_steps=self.scaling.accumulation_for(world_size),
                                      keep_total_batch=False)
        return dataclasses.replace(self, scaling=scaling)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_config(source: Union[str, Path, Dict[str, Any]], overrides: Optional[List[str]] = None) -> TrainConfig:
    """Read a YAML file (or a dict), apply ``a.b=value`` overrides, build and validate the config."""
    raw, origin = read_mapping(source, "config file", "model, data, optim, ... sections", label="config")
    try:
        for item in overrides or []:
            apply_override(raw, item, "optim.lr=2e-4")
        cfg = parse_section(TrainConfig, raw, "")
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    return cfg


_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# the ranges of numeric fields (a field left None is not set and passes)
_POSITIVE = ("optim.lr", "optim.lr_linear_proj_mult", "optim.epochs", "optim.lr_drop", "optim.max_steps",
             "scaling.cpus_per_worker", "scaling.batch_size_per_worker", "scaling.accumulation_steps",
             "deepspeed.bucket_size", "model.num_classes", "checkpoint.every_n_steps", "checkpoint.every_n_epochs",
             "checkpoint.num_to_keep", "run.stall_timeout_s", "tracking.log_every_n_steps")
_NON_NEGATIVE = ("optim.lr_backbone", "optim.weight_decay", "optim.clip_max_norm", "scaling.resize_check_interval_s",
                 "run.max_failures")


def validate(cfg: TrainConfig) -> None:
    """Cross-field and range checks; raises ConfigError naming the field."""
    for name in _POSITIVE:
        _positive(name, functools.reduce(getattr, name.split("."), cfg))
    for name in _NON_NEGATIVE:
        _non_negative(name, functools.reduce(getattr, name.split("."), cfg))
    if not 0 < cfg.optim.lr_drop_factor <= 1:
        raise ConfigError(f"optim.lr_drop_factor: {cfg.optim.lr_drop_factor} must be in (0, 1]")
    s = cfg.scaling
    if s.elastic:
        if len(s.num_workers) != 2 or s.num_workers[0] > s.num_workers[1]:
            raise ConfigError(f"scaling.num_workers: {s.num_workers} must be an integer or [min, max] "
                              "with min <= max, e.g. [2, 8]")
        _positive("scaling.num_workers[0] (min)", s.num_workers[0])
    else:
        _positive("scaling.num_workers", s.num_workers)
    for resource, amount in s.resources_per_worker.items():
        if resource in ("CPU", "GPU"):
            raise ConfigError(f"scaling.resources_per_worker.{resource}: set scaling.cpus_per_worker / use_gpu instead")
        _positive(f"scaling.resources_per_worker.{resource}", amount)
    if s.keeps_total_batch:  # fails here, before any worker starts, at the first size that cannot keep it
        for world_size in range(s.min_workers, s.max_workers + 1):
            s.accumulation_for(world_size)
    if cfg.deepspeed.precision == "fp16" and not s.use_gpu:
        raise ConfigError("deepspeed.precision: fp16 needs scaling.use_gpu: true; use fp32 or bf16 on CPU")
    if not cfg.model.preset:
        raise ConfigError("model.preset: a dino_core preset name is required, e.g. dino_tiny")
    if not cfg.data.train_uri:
        raise ConfigError("data.train_uri: required (a directory or s3:// prefix written by `dino ingest`)")
    if not _RUN_NAME.match(cfg.run.name):
        raise ConfigError(f"run.name: {cfg.run.name!r} must be letters, digits, '_', '-' or '.'")
    if not cfg.run.storage_path:
        raise ConfigError("run.storage_path: required (a local directory or s3://bucket/prefix)")


def _positive(name: str, value: Optional[float]) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{name}: {value} must be > 0")


def _non_negative(name: str, value: Optional[float]) -> None:
    if value is not None and value < 0:
        raise ConfigError(f"{name}: {value} must be >= 0")


_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|api_key|access_key)", re.IGNORECASE)
_URI_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


def flat_params(cfg: TrainConfig) -> Dict[str, str]:
    """``{"optim.lr": "0.0001", ...}`` for tracking; secret-looking keys and URI credentials redacted."""
    flat: Dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
            return
        text = "" if node is None else str(node)
        if _SECRET_KEY.search(prefix.rsplit(".", 1)[-1]):
            text = "***"
        flat[prefix] = _URI_USERINFO.sub(r"\1***@", text)

    walk(cfg.to_dict(), "")
    return flat
