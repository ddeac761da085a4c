"""The one protocol a stage kind implements; ``pipeline/stages/<kind>.py`` holds one each.

A kind is its spec dataclass plus the functions below. The loader, the preflight and the runner
only loop over the registry (``pipeline.stages.KINDS``), so adding a kind is one new file ending
in ``KIND = StageKind(...)`` and its name in ``stages/__init__.py`` (or ``register(KIND)``).

- ``validate(scope, name, stage)``: cross-field checks without storage or a cluster (``scope``
  resolves dataset and stage references, ``validation.Scope``); raise ConfigError naming the field;
- ``fingerprint(ctx, name, stage)``: hash of the stage's config, the digests of the datasets it
  reads and the fingerprints (or content hashes) of the weights it reads;
- ``run(ctx, name, stage, fp) -> (outputs, details)``: do the work; ``outputs`` go to the state file
  and to later stages, ``details`` to the run log (e.g. ``{"action": "resumed", "resumed_from_step": 4}``);
- ``outputs_exist(ctx, outputs)``: whether a recorded result can still be used;
- ``summary(outputs)``: the stage's line in the pipeline summary;
- ``preflight(spec, name, stage)``: checks that need storage (inputs that must exist);
- ``workers(spec, name, stage)``: the ``WorkerGroup`` the cluster must fit, or None;
- ``datasets(stage)``: the datasets it names (a kind producing ``shards`` ingests them, others read them).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple


def _nothing(*_args) -> None:
    return None


class WorkerGroup(NamedTuple):
    where: str  # the field that sets it, for errors (``config.scaling``)
    workers: int
    cpus: float  # per worker
    gpus: int  # per worker
    streams_data: bool = False  # fed by Ray Data while it runs: a fixed cluster must keep a CPU free for it


class StageKind(NamedTuple):
    name: str
    spec: type  # the stage's dataclass (its fields are the YAML keys under stages.<name>)
    outputs: Tuple[str, ...]  # what later stages may read from it by name
    validate: Callable[[Any, str, Any], None]
    fingerprint: Callable[[Any, str, Any], str]
    run: Callable[[Any, str, Any, str], Tuple[Dict[str, Any], Dict[str, Any]]]
    outputs_exist: Callable[[Any, Dict[str, Any]], bool]
    summary: Callable[[Dict[str, Any]], str]
    preflight: Callable[[Any, str, Any], None] = _nothing
    workers: Callable[[Any, str, Any], Optional[WorkerGroup]] = _nothing
    datasets: Callable[[Any], List[str]] = lambda stage: []


def stage_config_dict(stage: Any) -> Dict[str, Any]:
    """The stage's declaration as plain data (for fingerprints and logs)."""
    return dataclasses.asdict(stage)
