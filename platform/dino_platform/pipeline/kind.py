"""The one protocol a stage kind implements; ``pipeline/stages/<kind>.py`` holds one each, listed in
``stages/__init__.py``. The loader, the preflight and the runner only loop over them.

- ``validate(scope, name, stage)``: checks without storage or a cluster; ``scope`` (``validation.Scope``)
  resolves dataset and stage references; raise ConfigError naming the field;
- ``fingerprint(ctx, name, stage)``: hash of the config, the digests of the datasets and the identity
  of the weights it reads;
- ``run(ctx, name, stage, fp) -> (outputs, details)``: ``outputs`` go to the state file and to later
  stages, ``details`` to the run log (e.g. ``{"action": "resumed", "resumed_from_step": 4}``);
- ``outputs_exist(ctx, outputs)``: whether a recorded result can still be used;
- ``summary(outputs)``: its line in the pipeline summary (None: no line);
- ``preflight(spec, name, stage)``: checks that need storage; ``workers(spec, name, stage)``: the
  ``WorkerGroup`` the cluster must fit; ``datasets(stage)``: the datasets it names (ingested by a
  kind that outputs ``shards``, read by the others).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple


def holds(check: Callable[[], Any], *errors: type) -> bool:
    """``bool(check())``; False when it raises one of ``errors`` (an output that is gone or unreadable)."""
    try:
        return bool(check())
    except errors:
        return False


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
    summary: Callable[[Dict[str, Any]], Optional[str]]
    preflight: Callable[[Any, str, Any], None] = lambda spec, name, stage: None
    workers: Callable[[Any, str, Any], Optional[WorkerGroup]] = lambda spec, name, stage: None
    datasets: Callable[[Any], List[str]] = lambda stage: []

