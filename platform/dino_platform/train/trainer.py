"""Driver side of a training job: datasets, MLflow run, and the Ray Train ``TorchTrainer``.

    cfg = load_config("job.yaml")
    outcome = run_training(cfg)      # resumes by itself if <storage_path>/<run.name> has checkpoints
    outcome.checkpoint.path          # latest checkpoint: deepspeed/ state + model.pt
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from dino_platform.data.manifest import read_ground_truth, read_manifest
from dino_platform.data.sharding import OrderedShards
from dino_platform.data.streaming import SAMPLE_ERRORS_DIR, build_eval_dataset, build_train_dataset, dataset_size
from dino_platform.errors import ConfigError, StallError, TrainingError
from dino_platform.ray_session import connect
from dino_platform.storage import resolve
from dino_platform.tracking import MetricsLogger, finish_run, resolve_tracking_uri, start_or_resume_run
from dino_platform.model.artifact import weights_location
from dino_platform.run_state import read_train_state, stall_reports, worker_groups
from dino_platform.train.config import TrainConfig, flat_params
from dino_platform.train.loop import WorkerInputs, train_loop_per_worker
from dino_platform.watchdog import stall_timeout

log = logging.getLogger("dino.train")


@dataclass
class TrainingOutcome:
    checkpoint: Any  # ray.train.Checkpoint (latest), or None
    metrics: Optional[Dict[str, Any]]  # last metrics reported with a checkpoint
    run_dir: str  # <storage_path>/<run.name>
    tracking: Any  # TrackingTarget or None
    error: Optional[BaseException]
    # the worker groups Ray Train started, in order: {"step", "world_size", "resized_from", ...}
    worker_groups: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def restarts(self) -> int:
        """Worker-group starts after the first (lost workers or nodes, resizes)."""
        return max(len(self.worker_groups) - 1, 0)

    @property
    def resizes(self) -> int:
        """Restarts at another world size than the group before."""
        sizes = [g["world_size"] for g in self.worker_groups]
        return sum(1 for a, b in zip(sizes, sizes[1:]) if a != b)


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

    Joins the Ray cluster at ``$RAY_ADDRESS``, else starts a local instance (``ray_session.connect``).
    Checkpoints go to ``<run.storage_path>/<run.name>`` (local or S3, resolved by ``dino_platform.storage``).
    ``callbacks``: Ray Train callbacks, e.g. a sweep trial's reporter to Tune.
    ``start_from``: a training checkpoint (URI of a ``checkpoint_step*`` directory, possibly of
    another run) whose whole state (weights, optimizer, step, epoch) a *new* run continues from,
    with ``cfg``'s hyper-parameters; once the run has checkpoints of its own, those win.
    """
    connect()
    storage = resolve(cfg.run.storage_path)
    run_location = storage.child(cfg.run.name)
    datasets = _datasets(cfg, run_location)
    start = read_train_state(start_from) if start_from else None
    inputs = WorkerInputs(  # validated before an MLflow run is opened; locations resolved here, on the driver
        cfg, dataset_size(cfg.data.train_uri), run_location, session=uuid.uuid4().hex,
        ground_truth=read_ground_truth(cfg.data.eval_uri) if cfg.data.eval_uri else None,
        init_location=weights_location(cfg.model.init_from) if cfg.model.init_from else None,
        start_location=start.location if start is not None else None,
        # an audit of the data semantics: each rank logs the image ids of every step (tests, debugging)
        image_log=os.environ.get("DINO_TRAIN_IMAGE_LOG") or None)
    if cfg.tracking.enabled:
        inputs = dataclasses.replace(inputs, tracking=_open_tracking(cfg, run_location.uri))
    trainer = _torch_trainer(cfg, storage, inputs, datasets, start, callbacks)
    s = cfg.scaling
    log.info("run %s: %s workers x batch %d x accumulation %d = total batch %d; %d steps/epoch x %d epochs",
             cfg.run.name, s.num_workers, s.batch_size_per_worker, s.accumulation_steps,
             cfg.total_batch_size, inputs.plan(s.max_workers).steps_per_epoch, cfg.optim.epochs)
    if s.elastic:
        log.info("elastic group %s (%s): %s", s.num_workers, s.placement_strategy, ", ".join(
            f"{w} workers x accumulation {cfg.at_world_size(w).scaling.accumulation_steps}"
            for w in range(s.min_workers, s.max_workers + 1)))
    nodes_at_start = _alive_nodes()
    try:
        result = trainer.fit()
        checkpoint, metrics, error = result.checkpoint, result.metrics, result.error
    except Exception as exc:  # TrainingFailedError: workers failed more than max_failures times
        checkpoint, metrics, error = None, None, exc
    return _outcome(inputs, checkpoint, metrics, error, nodes_at_start)


def _datasets(cfg: TrainConfig, run_location) -> Dict[str, Any]:
    """Ray Datasets {"train", "eval" (with data.eval_uri)}; skipped samples are recorded under the run."""
    categories = read_manifest(cfg.data.train_uri).categories
    if categories and max(categories) >= cfg.model.num_classes:
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes} is too small for category id "
                          f"{max(categories)} of {cfg.data.train_uri}; use {max(categories) + 1}")
    policy = {"on_sample_error": cfg.data.on_sample_error, "error_log": run_location.child(SAMPLE_ERRORS_DIR)}
    datasets = {"train": build_train_dataset(cfg.data.train_uri, cfg.data.transform, cfg.run.seed, **policy)}
    if cfg.data.eval_uri:
        datasets["eval"] = build_eval_dataset(cfg.data.eval_uri, cfg.data.transform, **policy)
    return datasets


def _torch_trainer(cfg: TrainConfig, storage, inputs: WorkerInputs, datasets, start, callbacks) -> TorchTrainer:
    """Ray Train's trainer: the worker loop and its inputs, scaling, process group, storage, failures, checkpoints."""
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": inputs},
        scaling_config=ray_scaling_config(cfg),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo",
                                 timeout_s=collective_timeout_s(cfg)),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage.path,
            storage_filesystem=storage.fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=OrderedShards(inputs.run_location, start_epoch=start.epoch if start else 0,
                                     start_location=inputs.start_location),
    )


def _outcome(inputs: WorkerInputs, checkpoint, metrics: Optional[Dict[str, Any]], error: Optional[BaseException],
             nodes_at_start: Dict[str, str]) -> TrainingOutcome:
    """Collect what the workers recorded (skipped samples, stalls, worker groups), close the MLflow run,
    and return the outcome; a failed run raises, naming a stall or a lost node when that was the cause."""
    cfg, run_location = inputs.cfg, inputs.run_location
    skipped = _skipped_samples(run_location.child(SAMPLE_ERRORS_DIR))
    stalls = stall_reports(run_location, inputs.session)
    for report in stalls:
        log.error("run %s: a worker stalled; its watchdog reported:\n%s", cfg.run.name, report)
    groups = worker_groups(run_location, inputs.session)
    if inputs.tracking is not None:
        if skipped:
            logger = MetricsLogger(inputs.tracking)
            logger.log_metrics({"data/skipped_samples": len(skipped)}, step=0)
            logger.log_dict({"skipped": skipped}, "sample_errors.json")
        finish_run(inputs.tracking, status="FAILED" if error else "FINISHED")
    outcome = TrainingOutcome(checkpoint=checkpoint, metrics=metrics, run_dir=run_location.uri,
                              tracking=inputs.tracking, error=error, worker_groups=groups)
    if outcome.restarts:
        log.info("run %s: %d worker-group restarts, %d resizes (%s)", cfg.run.name, outcome.restarts,
                 outcome.resizes, " -> ".join(str(g["world_size"]) for g in groups))
    if error is None:
        return outcome
    if stalls:
        raise StallError(
            f"run {cfg.run.name}: training failed after {len(stalls)} stall(s) (run.max_failures is "
            f"{cfg.run.max_failures}; run.stall_timeout_s is {cfg.run.stall_timeout_s or 'sized from step times'}). "
            f"The run continues from its last checkpoint in {run_location.uri} when started again. Last report:\n"
            f"{stalls[-1]}") from error
    lost = lost_nodes(error) or _nodes_lost_since(nodes_at_start, error)
    if lost:
        raise TrainingError(
            f"run {cfg.run.name}: training failed: lost {', '.join(lost)} (the node and its workers died); "
            f"run.max_failures is {cfg.run.max_failures} and scaling.num_workers is {cfg.scaling.num_workers}. The "
            f"run continues from its last checkpoint in {run_location.uri} when started again; to ride through lost "
            "nodes, set run.max_failures > 0 and scaling.num_workers: [min, max]") from error
    raise error


def collective_timeout_s(cfg: TrainConfig) -> int:
    """The process group's timeout: past the stall timeout, so a collective waiting on a lost peer
    errors instead of hanging, after the watchdog has had the chance to report where it waited."""
    return int(math.ceil(1.5 * stall_timeout(cfg.run.stall_timeout_s, [])))


def _skipped_samples(error_log) -> List[Dict[str, Any]]:
    """The records ``data.on_sample_error: skip`` wrote for this run (all its passes), in file order."""
    records = [json.loads(error_log.child(name).read_bytes()) for name in error_log.list_files()]
    if records:
        log.warning("%d samples were skipped (data.on_sample_error: skip); listed in %s", len(records), error_log.uri)
    return records


def lost_nodes(error: BaseException) -> List[str]:
    """'node <id> (<ip>)' for every worker that died with its node, from Ray Train's error (else [])."""
    failures = getattr(error, "worker_failures", None) or {}
    lost = []
    for failure in failures.values():
        text = str(failure)
        if "node" not in text.lower() or not re.search(r"node (has )?died|raylet|NodeDied|node .* (was|is) (dead|lost)",
                                                        text, re.IGNORECASE):
            continue
        node = re.search(r"node[ _]?id[:=\s]+([0-9a-f]{16,})", text, re.IGNORECASE)
        ip = re.search(r"\bip[:= ]+([0-9.]+)|node IP[:= ]+([0-9.]+)|\(ip=([0-9.]+)", text, re.IGNORECASE)
        name = f"node {node.group(1)}" if node else "a node"
        address = next((g for g in ip.groups() if g), None) if ip else None
        lost.append(f"{name} ({address})" if address else name)
    return list(dict.fromkeys(lost))  # each node once, in order


def _alive_nodes() -> Dict[str, str]:
    """{node id: IP} of the Ray nodes alive now."""
    return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}


def _nodes_lost_since(before: Dict[str, str], error: BaseException, wait_s: float = 60.0) -> List[str]:
    """Nodes alive at the start and dead now, for a worker-group failure. A killed node's workers surface as
    "actor unavailable" before the GCS declares the node dead (missed health checks): wait for that verdict."""
    if not getattr(error, "worker_failures", None):
        return []
    deadline = time.monotonic() + wait_s
    while True:
        alive = _alive_nodes()
        lost = [f"node {node_id} ({ip})" for node_id, ip in before.items() if node_id not in alive]
        if lost or time.monotonic() > deadline:
            return lost
        time.sleep(1.0)


def _open_tracking(cfg: TrainConfig, run_dir: str):
    # the default SQLite store lives under the run directory when that is local, else under ./runs
    local_dir = Path(run_dir) if "://" not in run_dir else Path("runs") / cfg.run.name
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, local_dir)
    return start_or_resume_run(
        tracking_uri=uri, experiment=cfg.tracking.experiment, run_key=run_dir, run_name=cfg.run.name,
        params=flat_params(cfg), config_yaml=cfg.to_yaml(), artifact_dir=local_dir / "mlartifacts",
    )
