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


class OrderedShards(ray.train.DataConfig):
    """A ``ray.train.DataConfig`` that splits every dataset in a reproducible order.

    ``preserve_order`` makes Ray Data's splitter deal blocks out deterministically (it otherwise
    follows locality and timing), which exact resume relies on. Training shards are equal-sized
    (every worker runs the same number of steps, so collectives never wait on a finished worker);
    evaluation shards are not, so no evaluation image is dropped.

    Resuming: the training pipeline draws each pass's augmentation and file order from the number
    of passes made so far, which a fresh split (a restarted worker group, a resumed job) would
    count from 0. ``run_location`` lets ``configure`` read the epoch of the checkpoint Ray Train
    resumes from (its checkpoint_manager_snapshot.json) and start the count there;
    ``start_epoch`` is the count when the run has no checkpoint of its own yet (a run started from
    another run's checkpoint, e.g. a PBT trial that cloned a better one).
    """

    def __init__(self, run_location=None, start_epoch: int = 0):
        super().__init__()
        self.run_location = run_location
        self.start_epoch = start_epoch

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        passes_done = _resume_epoch(self.run_location) if self.run_location is not None else None
        if passes_done is None:
            passes_done = self.start_epoch
        output: List[Dict[str, Any]] = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            options = self.default_ingest_options()
            options.preserve_order = True
            dataset.context.execution_options = options
            if name == "train":
                # NOTE: private attribute; data.streaming and Ray Data's file shuffling read it
                dataset.context._execution_idx = passes_done
            for rank, split in enumerate(dataset.streaming_split(world_size, equal=(name == "train"))):
                output[rank][name] = split
        return output


def _resume_epoch(run_location) -> Optional[int]:
    """Epoch of the latest registered checkpoint of the run at ``run_location`` (None if none)."""
    from dino_platform.train.checkpoint import latest_registered_checkpoint

    latest = latest_registered_checkpoint(run_location)
    return None if latest is None else int((latest.get("metrics") or {}).get("epoch", 0))


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
    from dino_platform.data.streaming import (
        SAMPLE_ERRORS_DIR, build_eval_dataset, build_train_dataset, dataset_size, read_manifest,
    )
    from dino_platform.train.checkpoint import read_train_state, weights_location

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True)
    categories = read_manifest(cfg.data.train_uri).categories
    if categories and max(categories) >= cfg.model.num_classes:
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes} is too small for category id "
                          f"{max(categories)} of {cfg.data.train_uri}; use {max(categories) + 1}")
    storage = resolve(cfg.run.storage_path)
    run_dir = storage.child(cfg.run.name).uri
    error_log = storage.child(cfg.run.name).child(SAMPLE_ERRORS_DIR)
    policy = {"on_sample_error": cfg.data.on_sample_error, "error_log": error_log}
    datasets = {"train": build_train_dataset(cfg.data.train_uri, cfg.data.transform, cfg.run.seed, **policy)}
    if cfg.data.eval_uri:
        datasets["eval"] = build_eval_dataset(cfg.data.eval_uri, cfg.data.transform, **policy)
    plan = plan_epochs(dataset_size(cfg.data.train_uri), cfg)
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
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
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
    skipped = _skipped_samples(error_log)
    if tracking is not None:
        from dino_platform.tracking import MetricsLogger, finish_run

        if skipped:
            logger = MetricsLogger(tracking)
            logger.log_metrics({"data/skipped_samples": len(skipped)}, step=0)
            logger.log_dict({"skipped": skipped}, "sample_errors.json")
        finish_run(tracking, status="FAILED" if error else "FINISHED")
    outcome = TrainingOutcome(checkpoint=checkpoint, metrics=metrics, run_dir=run_dir, tracking=tracking, error=error)
    if error is not None:
        raise error
    return outcome


def _skipped_samples(error_log) -> List[Dict[str, Any]]:
    """The records ``data.on_sample_error: skip`` wrote for this run (all its passes), in file order."""
    import json

    records = [json.loads(error_log.child(name).read_bytes()) for name in sorted(error_log.list_files())]
    if records:
        log.warning("%d samples were skipped (data.on_sample_error: skip); listed in %s", len(records), error_log.uri)
    return records


def _open_tracking(cfg: TrainConfig, run_dir: str):
    from dino_platform.tracking import resolve_tracking_uri, start_or_resume_run

    # the default SQLite store lives under the run directory when that is local, else under ./runs
    local_dir = Path(run_dir) if "://" not in run_dir else Path("runs") / cfg.run.name
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, local_dir)
    return start_or_resume_run(
        tracking_uri=uri, experiment=cfg.tracking.experiment, run_key=run_dir, run_name=cfg.run.name,
        params=flat_params(cfg), config_yaml=cfg.to_yaml(), artifact_dir=local_dir / "mlartifacts",
    )
