"""Checks that need the cluster or storage, run after connecting to Ray and before the first stage.

- Resources: every train/evaluate stage's ``workers x cpus/gpus_per_worker`` must fit the cluster:
  its autoscaling limits when it has them (a launcher cluster whose GPU nodes start on demand),
  else ``ray.cluster_resources()``; one worker must fit on one node; and on a fixed cluster the
  training workers must leave a CPU for Ray Data to read with (else the job waits forever).
- Datasets that are not ingested by the pipeline must already have shards; raw sources to ingest
  must exist (unless their shards are already complete).
- Checkpoint URIs and registry models that stages read must exist.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Tuple

from dino_platform.errors import ConfigError, DataError, StorageError
from dino_platform.pipeline.spec import EvaluateStage, IngestStage, InferStage, PipelineSpec, PredictStage, TrainStage
from dino_platform.ray_session import init_local_ray, state_api_runtime_env

log = logging.getLogger("dino.pipeline")


def connect_ray(spec: PipelineSpec) -> str:
    """Join the Ray cluster this pipeline runs on; returns a description for the log.

    ``ray.address`` in the spec, else ``RAY_ADDRESS`` (set by ``ray job submit``), else a fresh local
    instance with ``ray.num_cpus`` CPUs (never a cluster someone else started on this machine).
    """
    import ray

    if ray.is_initialized():
        return "the Ray instance this process already uses"
    address = spec.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=state_api_runtime_env(address))
        return f"Ray cluster at {address}"
    # the dashboard on, its State API named: Ray Train's PlacementGroupCleaner needs it (ray_session)
    init_local_ray(num_cpus=spec.ray.num_cpus, log_to_driver=True)
    return f"a local Ray instance ({spec.ray.num_cpus or 'all'} CPUs)"


def stage_workers(spec: PipelineSpec, name: str) -> Optional[Tuple[int, float, int]]:
    """(workers, CPUs per worker, GPUs per worker) of a train/evaluate stage, as it will run."""
    stage = spec.stages[name]
    if isinstance(stage, TrainStage):
        cfg = spec.train_config(name)
        # an elastic group must fit at its minimum size; it grows into whatever else there is
        return cfg.scaling.min_workers, cfg.scaling.cpus_per_worker, 1 if cfg.scaling.use_gpu else 0
    if isinstance(stage, EvaluateStage):
        r = stage.resources
        return r.workers or 1, r.cpus_per_worker or 0.5, r.gpus_per_worker
    return None


def check_resources(spec: PipelineSpec, total: Dict[str, float], nodes: List[Dict[str, float]],
                    autoscaling_max: Optional[Dict[str, float]]) -> None:
    """Raise ConfigError naming the stage when its workers cannot ever be placed (pure function)."""
    capacity = autoscaling_max or total
    where_from = "the autoscaler's maximum" if autoscaling_max else "ray.cluster_resources()"
    for name in spec.stages:
        shape = stage_workers(spec, name)
        if shape is None:
            continue
        workers, cpus, gpus = shape
        field = f"stages.{name}.resources"
        for resource, per_worker in (("CPU", cpus), ("GPU", gpus)):
            need = workers * per_worker
            have = float(capacity.get(resource, 0))
            if need > have + 1e-9:
                raise ConfigError(
                    f"{field}: {workers} workers x {per_worker:g} {resource} = {need:g} {resource}, but the cluster "
                    f"has {have:g} ({where_from}); lower workers or {resource.lower()}s_per_worker, or use a "
                    "bigger cluster")
            largest = max((n.get(resource, 0.0) for n in nodes), default=0.0)
            if not autoscaling_max and per_worker > largest + 1e-9:
                raise ConfigError(f"{field}: one worker needs {per_worker:g} {resource} but the largest node has "
                                  f"{largest:g}")
        if isinstance(spec.stages[name], TrainStage) and not autoscaling_max:
            spare = float(capacity.get("CPU", 0)) - workers * cpus
            if spare < 1 - 1e-9:
                raise ConfigError(
                    f"{field}: {workers} workers x {cpus:g} CPU leave {spare:g} of the cluster's "
                    f"{float(capacity.get('CPU', 0)):g} CPUs for Ray Data, which needs 1 to read the training "
                    "data (the job would wait forever); lower cpus_per_worker (fractions are fine, e.g. 0.5)")


def cluster_shape() -> Tuple[Dict[str, float], List[Dict[str, float]], Optional[Dict[str, float]]]:
    """(total resources, each alive node's resources, autoscaling maxima or None) of the current cluster."""
    import ray

    total = dict(ray.cluster_resources())
    nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    try:
        from ray._private.state import state  # NOTE: private; Ray Train's own pre-start check uses it

        maxima = state.get_max_resources_from_cluster_config()
    except Exception:  # older/newer Ray without it: fall back to what is there now
        maxima = None
    return total, nodes, maxima or None


def check_inputs(spec: PipelineSpec) -> None:
    """Datasets, checkpoints and registry models that must exist before the first stage runs."""
    from dino_platform.data.manifest import read_manifest
    from dino_platform.storage import resolve

    ingested = {d for s in spec.stages.values() if isinstance(s, IngestStage) for d in s.datasets}
    for name, ds in spec.datasets.items():
        if name not in ingested:
            if not _used(spec, name):
                continue
            try:
                read_manifest(spec.shards_uri(name))
            except (DataError, StorageError) as exc:
                raise DataError(f"datasets.{name}: missing dataset: {exc}") from None
            continue
        if ds.synth is not None or _shards_complete(spec.shards_uri(name)):
            continue
        for field, uri, want_file in (("annotations", ds.annotations, True), ("images", ds.images, False)):
            location = resolve(uri)
            ok = location.is_file() if want_file else bool(location.list_files(recursive=False) or location.exists())
            if not ok:
                raise DataError(f"datasets.{name}.{field}: missing dataset: {uri} does not exist (and "
                                f"{spec.shards_uri(name)} holds no finished ingest)")
    for name, stage in spec.stages.items():
        refs = []
        if isinstance(stage, TrainStage) and stage.init is not None:
            refs.append((f"stages.{name}.init", stage.init.uri, stage.init.model))
        elif isinstance(stage, EvaluateStage):
            refs.append((f"stages.{name}.checkpoint", stage.checkpoint.uri, stage.checkpoint.model))
        elif isinstance(stage, PredictStage):
            refs.append((f"stages.{name}.model", stage.model.uri, stage.model.model))
            for i, uri in enumerate(stage.images):
                if not resolve(uri).is_file():
                    raise DataError(f"stages.{name}.images[{i}]: {uri} does not exist")
        elif isinstance(stage, InferStage):
            refs.append((f"stages.{name}.model", stage.model.uri, stage.model.model))
            if stage.images is not None and not resolve(stage.images).list_files():
                raise DataError(f"stages.{name}.images: {stage.images} holds no files")
        for field, uri, model in refs:
            if uri:
                from dino_platform.train.checkpoint import weights_location

                try:
                    weights_location(uri)
                except StorageError as exc:
                    raise StorageError(f"{field}.uri: {exc}") from None
            if model:
                from dino_platform.registry.models import resolve_version

                resolve_version(model, spec.tracking_uri(), field=f"{field}.model")


def _used(spec: PipelineSpec, dataset: str) -> bool:
    for stage in spec.stages.values():
        if isinstance(stage, TrainStage) and dataset in (stage.train_data, stage.eval_data):
            return True
        if isinstance(stage, EvaluateStage) and stage.data == dataset:
            return True
        if isinstance(stage, (PredictStage, InferStage)) and stage.dataset == dataset:
            return True
    return False


def _shards_complete(uri: str) -> bool:
    from dino_platform.data.manifest import verify_shards

    try:
        verify_shards(uri)
        return True
    except (DataError, StorageError):
        return False


def preflight(spec: PipelineSpec) -> Dict[str, float]:
    """Every check that needs the cluster or storage; returns the cluster's resources for the log."""
    total, nodes, maxima = cluster_shape()
    check_resources(spec, total, nodes, maxima)
    check_inputs(spec)
    return maxima or total
