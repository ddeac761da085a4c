"""Driver side of a training job: datasets, MLflow run, and the Ray Train ``TorchTrainer``.

    cfg = load_config("job.yaml")
    outcome = run_training(cfg)      # resumes by itself if <storage_path>/<run.name> has checkpoints
    outcome.checkpoint.path          # latest checkpoint: deepspeed/ state + model.pt
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from dino_platform.data.sharding import OrderedShards
from dino_platform.errors import ConfigError
from dino_platform.storage import resolve
from dino_platform.train.config import TrainConfig, flat_params
from dino_platform.train.loop import EpochPlan, train_loop_per_worker

log = logging.getLogger("dino.train")


@dataclass
class TrainingOutcome:
    checkpoint: Any  # ray.train.Checkpoint (latest), or None
    metrics: Optional[Dict[str, Any]]  # last metrics reported with a checkpoint
    run_dir: str  # <storage_path>/<run.name>
    tracking: Any  # TrackingTarget or None
    error: Optional[BaseException]


def plan_epochs(num_train_images: int, cfg: TrainConfig) -> EpochPlan:
    """Micro-batches per worker and optimizer steps per epoch (equal shards, drop_last, whole accumulations)."""
    s = cfg.scaling
    per_worker = num_train_images // s.num_workers
    micro = per_worker // s.batch_size_per_worker
    micro -= micro % s.accumulation_steps
    if micro == 0:
        raise ConfigError(
            f"data.train_uri: {num_train_images} training images are fewer than one optimizer step needs "
            f"(scaling: {s.num_workers} workers x batch {s.batch_size_per_worker} x accumulation {s.accumulation_steps})"
        )
    return EpochPlan(micro_batches_per_epoch=micro, steps_per_epoch=micro // s.accumulation_steps)


def ray_scaling_config(cfg: TrainConfig) -> ray.train.ScalingConfig:
    """Ray Train's ScalingConfig: a (min, max) tuple for an elastic group, the placement strategy, resources."""
    s = cfg.scaling
    return ray.train.ScalingConfig(
        num_workers=(s.min_workers, s.max_workers) if s.elastic else s.num_workers,
        use_gpu=s.use_gpu,
        resources_per_worker={"CPU": s.cpus_per_worker, **s.resources_per_worker},
        placement_strategy=s.placement_strategy,
        elastic_resize_monitor_interval_s=s.resize_check_interval_s,
    )


def run_training(cfg: TrainConfig, callbacks: Optional[List[Any]] = None,
                 start_from: Optional[str] = None) -> TrainingOutcome:
    """Train (or resume) the job described by ``cfg`` on the current Ray cluster and return its outcome.

    Starts a local Ray instance when none is running. Checkpoints go to
    ``<run.storage_path>/<run.name>`` (local or S3, resolved by ``dino_platform.storage``).
    ``callbacks``: Ray Train callbacks, e.g. a sweep trial's reporter to Tune.
    ``start_from``: a training checkpoint (URI of a ``checkpoint_step*`` directory, possibly of
    another run) whose whole state (weights, optimizer, step, epoch) a *new* run continues from,
    with ``cfg``'s hyper-parameters; once the run has checkpoints of its own, those win.
    """
    from dino_platform.data.manifest import read_ground_truth
    from dino_platform.data.streaming import build_eval_dataset, build_train_dataset, dataset_size, read_manifest
    from dino_platform.train.checkpoint import read_train_state, weights_location

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True)
    categories = read_manifest(cfg.data.train_uri).categories
    if categories and max(categories) >= cfg.model.num_classes:
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes} is too small for category id "
                          f"{max(categories)} of {cfg.data.train_uri}; use {max(categories) + 1}")
    datasets = {"train": build_train_dataset(cfg.data.train_uri, cfg.data.transform, cfg.run.seed)}
    if cfg.data.eval_uri:
        datasets["eval"] = build_eval_dataset(cfg.data.eval_uri, cfg.data.transform)
    plan = plan_epochs(dataset_size(cfg.data.train_uri), cfg)

    storage = resolve(cfg.run.storage_path)
    run_dir = storage.child(cfg.run.name).uri
    start = read_train_state(start_from) if start_from else None
    tracking = _open_tracking(cfg, run_dir) if cfg.tracking.enabled else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "plan": plan.__dict__,
            "tracking": tracking,
            # resolved here: workers may not share the driver's storage settings (AWS_* variables)
            "ground_truth": read_ground_truth(cfg.data.eval_uri) if cfg.data.eval_uri else None,
            "init_location": weights_location(cfg.model.init_from) if cfg.model.init_from else None,
            "start_location": start.location if start is not None else None,
        },
        scaling_config=ray_scaling_config(cfg),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage.path,
            storage_filesystem=storage.fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=OrderedShards(storage.child(cfg.run.name), start_epoch=start.epoch if start else 0),
    )
    log.info("run %s: %d workers x batch %d x accumulation %d = total batch %d; %d steps/epoch x %d epochs",
             cfg.run.name, cfg.scaling.num_workers, cfg.scaling.batch_size_per_worker, cfg.scaling.accumulation_steps,
             cfg.total_batch_size, plan.steps_per_epoch, cfg.optim.epochs)
    error: Optional[BaseException] = None
    try:
        result = trainer.fit()
        checkpoint, metrics, error = result.checkpoint, result.metrics, result.error
    except Exception as exc:  # TrainingFailedError: workers failed more than max_failures times
        checkpoint, metrics, error = None, None, exc
    if tracking is not None:
        from dino_platform.tracking import finish_run

        finish_run(tracking, status="FAILED" if error else "FINISHED")
    outcome = TrainingOutcome(checkpoint=checkpoint, metrics=metrics, run_dir=run_dir, tracking=tracking, error=error)
    if error is not None:
        raise error
    return outcome


def _open_tracking(cfg: TrainConfig, run_dir: str):
    from dino_platform.tracking import resolve_tracking_uri, start_or_resume_run

    # the default SQLite store lives under the run directory when that is local, else under ./runs
    local_dir = Path(run_dir) if "://" not in run_dir else Path("runs") / cfg.run.name
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, local_dir)
    return start_or_resume_run(
        tracking_uri=uri, experiment=cfg.tracking.experiment, run_key=run_dir, run_name=cfg.run.name,
        params=flat_params(cfg), config_yaml=cfg.to_yaml(), artifact_dir=local_dir / "mlartifacts",
    )
