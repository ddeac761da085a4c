"""Checks that need the cluster or storage, run after connecting to Ray and before the first stage.

- Resources: every stage that runs a worker group (its kind's ``workers``) must fit the cluster:
  its autoscaling limits when it has them (a launcher cluster whose GPU nodes start on demand),
  else ``ray.cluster_resources()``; one worker must fit on one node; and on a fixed cluster the
  training workers must leave a CPU for Ray Data to read with (else the job waits forever).
- Datasets that are not ingested by the pipeline must already have shards; raw sources to ingest
  must exist (unless their shards are already complete).
- Checkpoint URIs and registry models that stages read must exist (each kind's ``preflight``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from dino_platform.data.manifest import read_manifest
from dino_platform.errors import ConfigError, DataError, StorageError
from dino_platform.pipeline.spec import PipelineSpec
from dino_platform.pipeline.stages import KINDS


def check_resources(spec: PipelineSpec, total: Dict[str, float], nodes: List[Dict[str, float]],
                    autoscaling_max: Optional[Dict[str, float]]) -> None:
    """Raise ConfigError naming the stage when its workers cannot ever be placed (pure function)."""
    capacity = autoscaling_max or total
    where_from = "the autoscaler's maximum" if autoscaling_max else "ray.cluster_resources()"
    for name, stage in spec.stages.items():
        group = KINDS[stage.kind].workers(spec, name, stage)
        if group is None:
            continue
        workers, cpus, gpus = group.workers, group.cpus, group.gpus
        field = f"stages.{name}.{group.where}"
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
        if group.streams_data and not autoscaling_max:
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
    named = {False: set(), True: set()}  # ingested by the pipeline or not -> dataset names
    for stage in spec.stages.values():
        kind = KINDS[stage.kind]
        named["shards" in kind.outputs].update(kind.datasets(stage))
    for name in [d for d in spec.datasets if d in named[False] - named[True]]:  # must exist already
        try:
            read_manifest(spec.shards_uri(name))
        except (DataError, StorageError) as exc:
            raise DataError(f"datasets.{name}: missing dataset: {exc}") from None
    for name, stage in spec.stages.items():
        KINDS[stage.kind].preflight(spec, name, stage)


def preflight(spec: PipelineSpec) -> Dict[str, float]:
    """Every check that needs the cluster or storage; returns the cluster's resources for the log."""
    total, nodes, maxima = cluster_shape()
    check_resources(spec, total, nodes, maxima)
    check_inputs(spec)
    return maxima or total
