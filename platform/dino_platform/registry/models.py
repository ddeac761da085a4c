"""The MLflow model registry: evaluated checkpoints become versions; an alias follows the best AP.

A registered version is a plain artifact directory of the evaluation run, with no pickled code::

    model/weights.pt          {name: fp32 tensor}, official DINO key layout (torch.load(weights_only=True))
    model/model_config.json   preset, num_classes, overrides, categories {id: name}, transform, source

It is created with ``MlflowClient.create_model_version(source="runs:/<eval run>/model")`` and loads
offline with ``mlflow.artifacts.download_artifacts("models:/dino-coco@champion")``. Version tags:
``AP``, ``AP50`` (and the other COCO stats), ``data_digest.<dataset>``, ``config_hash``,
``parent_run.<stage>`` (pretrain, fine-tune ...), ``git_commit``, ``checkpoint``.

The alias (``champion``) moves to a new version only when its AP is higher than the current
holder's, and only when both were scored under the same protocol (tag ``eval.protocol``, e.g.
``official/num_select=300/maxDets=100``; a holder without it predates the tag and is not compared);
the decision is written to the version (``<alias>_decision``), the evaluation run and the log.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from dino_platform.errors import ConfigError, StorageError

log = logging.getLogger("dino.registry")

MODEL_DIR = "model"
WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "model_config.json"
MODEL_FORMAT = "dino-platform-model"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))$")


@dataclass
class Registration:
    name: str
    version: str
    alias: str
    champion_version: Optional[str]
    promoted: bool
    decision: str

    @property
    def version_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def alias_uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def resolve_version(model_uri: str, tracking_uri: str, field: str = "model"):
    """The ModelVersion ``models:/name@alias`` or ``models:/name/3`` names; ConfigError if there is none."""
    from mlflow.exceptions import MlflowException

    match = _MODEL_URI.match(model_uri)
    if not match:
        raise ConfigError(f"{field}: {model_uri!r} is not a registry URI like models:/dino-coco@champion")
    client = _client(tracking_uri)
    try:
        if match["alias"]:
            return client.get_model_version_by_alias(match["name"], match["alias"])
        return client.get_model_version(match["name"], match["version"])
    except MlflowException as exc:
        raise ConfigError(f"{field}: {model_uri} is not in the registry at {tracking_uri} "
                          f"({exc.message.splitlines()[0]}); check the name/alias and MLFLOW_TRACKING_URI") from None


def download_model(model_uri: str, tracking_uri: str, dst: Optional[str] = None) -> Path:
    """Fetch a registered version's files into ``dst`` (a temporary directory by default)."""
    import mlflow.artifacts

    version = resolve_version(model_uri, tracking_uri)
    dst = dst or tempfile.mkdtemp(prefix="dino-model-")
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=dst,
                                                    tracking_uri=tracking_uri))
    if not (path / WEIGHTS_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise StorageError(f"{model_uri} (version {version.version}, {version.source}): not a dino-platform "
                           f"model (expected {WEIGHTS_FILE} and {CONFIG_FILE})")
    return path


def export_model_files(checkpoint_uri: str, model: Mapping[str, Any], transform: Mapping[str, Any],
                       categories: Mapping[int, str], directory: Path) -> Dict[str, Any]:
    """Write ``weights.pt`` (official layout, via dino_core) and ``model_config.json`` into ``directory``."""
    import dino_core

    from dino_platform.train.checkpoint import read_model_state

    network, _, _ = dino_core.build_model(model["preset"], num_classes=model["num_classes"],
                                          **dict(model.get("overrides") or {}))
    dino_core.load_official_state_dict(network, read_model_state(checkpoint_uri), strict=True)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(dino_core.export_official_state_dict(network), directory / WEIGHTS_FILE)
    config = {
        "format": MODEL_FORMAT, "format_version": 1,
        "preset": model["preset"], "num_classes": int(model["num_classes"]),
        "overrides": dict(model.get("overrides") or {}),
        "categories": {str(k): v for k, v in sorted(categories.items())},
        "transform": dict(transform or {}),
        "source_checkpoint": checkpoint_uri,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return config


def git_commit(repo_dir: Optional[str] = None) -> str:
    """``$DINO_GIT_COMMIT``, else ``git rev-parse HEAD`` (+ ``-dirty`` with uncommitted changes), else unknown.

    A ``ray job submit`` working directory has no ``.git`` when it is excluded from the upload:
    pass the commit with ``--runtime-env-json '{"env_vars": {"DINO_GIT_COMMIT": "..."}}'``.
    """
    if os.environ.get("DINO_GIT_COMMIT"):
        return os.environ["DINO_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}-dirty" if dirty else head
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def register_evaluated(tracking_uri: str, name: str, alias: str, eval_run_id: str, checkpoint_uri: str,
                       model: Mapping[str, Any], transform: Mapping[str, Any], categories: Mapping[int, str],
                       metrics: Mapping[str, float], tags: Mapping[str, str],
                       protocol: Optional[Mapping[str, Any]] = None) -> Registration:
    """Register the checkpoint evaluated by ``eval_run_id`` (once) and decide whether ``alias`` moves to it.

    ``protocol``: the evaluation's recorded protocol (``coco_eval.json``'s ``protocol``), tagged on the
    version; the alias is only contested between versions with the same ``eval.protocol``.
    """
    from mlflow.exceptions import MlflowException

    from dino_platform.evaluation.coco_eval import protocol_tags

    client = _client(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="DINO detectors registered by dino-platform pipelines")
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{eval_run_id}'")
    if existing:
        version = existing[0]
        log.info("%s: this evaluation is already version %s", name, version.version)
    else:
        with tempfile.TemporaryDirectory(prefix="dino-register-") as staging:
            export_model_files(checkpoint_uri, model, transform, categories, Path(staging))
            client.log_artifacts(eval_run_id, staging, MODEL_DIR)
        version_tags = {**{k: _tag(v) for k, v in metrics.items()}, **tags, "checkpoint": checkpoint_uri,
                        **(protocol_tags(protocol) if protocol else {})}
        version = client.create_model_version(name, source=f"runs:/{eval_run_id}/{MODEL_DIR}", run_id=eval_run_id,
                                              tags=version_tags,
                                              description=f"{model['preset']} from {checkpoint_uri}")
        log.info("registered %s version %s (AP %.4f)", name, version.version, float(metrics.get("AP", float("nan"))))
    return _decide_alias(client, name, alias, version, float(metrics.get("AP", float("nan"))), eval_run_id)


def _decide_alias(client, name: str, alias: str, version, new_ap: float, eval_run_id: str) -> Registration:
    from mlflow.exceptions import MlflowException

    from dino_platform.evaluation.coco_eval import PROTOCOL_TAG

    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    if holder is not None and str(holder.version) == str(version.version):
        promoted, decision = False, f"version {version.version} already holds @{alias}"
    elif holder is None:
        promoted = math.isfinite(new_ap)
        decision = (f"version {version.version} becomes @{alias}: AP {new_ap:.4f}, no @{alias} before" if promoted
                    else f"version {version.version} not promoted: its AP is not a number")
    elif holder.tags.get(PROTOCOL_TAG) != version.tags.get(PROTOCOL_TAG):
        promoted = False  # AP under different protocols is not comparable (e.g. official vs top-100)
        decision = (f"version {version.version} stays out of @{alias}: scored under protocol "
                    f"{version.tags.get(PROTOCOL_TAG) or 'unrecorded'}, version {holder.version} under "
                    f"{holder.tags.get(PROTOCOL_TAG) or 'unrecorded'}; evaluate both the same way to compare them")
    else:
        held_ap = _float(holder.tags.get("AP"))
        promoted = math.isfinite(new_ap) and (not math.isfinite(held_ap) or new_ap > held_ap)
        verb = "beats" if promoted else "does not beat"
        decision = (f"version {version.version} {'becomes' if promoted else 'stays out of'} @{alias}: AP {new_ap:.4f} "
                    f"{verb} version {holder.version}'s AP {held_ap:.4f}")
    if promoted:
        client.set_registered_model_alias(name, alias, version.version)
    client.set_model_version_tag(name, version.version, f"{alias}_decision", decision)
    client.set_tag(eval_run_id, f"registry.{alias}_decision", decision)
    log.info("%s: %s", name, decision)
    champion = version.version if promoted else (holder.version if holder is not None else None)
    champion = str(champion) if champion is not None else None
    return Registration(name=name, version=str(version.version), alias=alias, champion_version=champion,
                        promoted=promoted, decision=decision)


def _float(text: Optional[str]) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def _tag(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
