"""The MLflow model registry: evaluated models become versions; an alias follows the best AP.

A registered version is the directory ``model/`` of the evaluation run, holding the files of a
model artifact (``model.artifact``: ``model.pt`` + ``model_config.json``, no pickled code); its tags
are the COCO stats, the caller's tags (``eval.protocol``, ``git_commit`` ...) and ``checkpoint``.

The alias (``champion``) moves to a new version only when its AP is higher than the current
holder's, and, with ``compare_on`` (e.g. ``eval.protocol``), only when both hold the same value of
that tag (a holder without it is not compared); the decision is written to the version
(``<alias>_decision``), the evaluation run and the log.
"""
from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from dino_platform.errors import ConfigError, StorageError

log = logging.getLogger("dino.registry")

MODEL_DIR = "model"
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


def download_model(model_uri: str, tracking_uri: str, dst: Optional[str] = None,
                   required: Sequence[str] = ()) -> Path:
    """Fetch a registered version's files into ``dst`` (a temporary directory by default); StorageError
    when one of the ``required`` file names is not among them."""
    import mlflow.artifacts

    version = resolve_version(model_uri, tracking_uri)
    dst = dst or tempfile.mkdtemp(prefix="dino-model-")
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=dst,
                                                    tracking_uri=tracking_uri))
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise StorageError(f"{model_uri} (version {version.version}, {version.source}): not a dino-platform "
                           f"model (no {', '.join(missing)}; expected {', '.join(required)})")
    return path


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


def register_evaluated(tracking_uri: str, name: str, alias: str, eval_run_id: str, artifact,
                       metrics: Mapping[str, float], tags: Mapping[str, str],
                       compare_on: Optional[str] = None) -> Registration:
    """Register ``artifact`` (a ``model.artifact.Artifact``) evaluated by ``eval_run_id`` (once) and decide
    whether ``alias`` moves to it; ``compare_on``: a tag whose value must match the holder's (module docstring)."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    new_ap = float(metrics.get("AP", float("nan")))
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
            artifact.write(Path(staging))
            client.log_artifacts(eval_run_id, staging, MODEL_DIR)
        metric_tags = {k: f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in metrics.items()}
        version_tags = {**metric_tags, **tags, "checkpoint": artifact.source}
        version = client.create_model_version(name, source=f"runs:/{eval_run_id}/{MODEL_DIR}", run_id=eval_run_id,
                                              tags=version_tags,
                                              description=f"{artifact.model.preset} from {artifact.source}")
        log.info("registered %s version %s (AP %.4f)", name, version.version, new_ap)
    return _decide_alias(client, name, alias, version, new_ap, eval_run_id, compare_on)


def _decide_alias(client, name: str, alias: str, version, new_ap: float, eval_run_id: str,
                  compare_on: Optional[str] = None) -> Registration:
    from mlflow.exceptions import MlflowException

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
    elif compare_on and holder.tags.get(compare_on) != version.tags.get(compare_on):
        promoted = False  # AP under different protocols is not comparable (e.g. official vs top-100)
        decision = (f"version {version.version} stays out of @{alias}: scored under {compare_on} "
                    f"{version.tags.get(compare_on) or 'unrecorded'}, version {holder.version} under "
                    f"{holder.tags.get(compare_on) or 'unrecorded'}; evaluate both the same way to compare them")
    else:
        held_ap = _float(holder.tags.get("AP"))
        promoted = math.isfinite(new_ap) and (not math.isfinite(held_ap) or new_ap > held_ap)
        decision = (f"version {version.version} {'becomes' if promoted else 'stays out of'} @{alias}: AP {new_ap:.4f} "
                    f"{'beats' if promoted else 'does not beat'} version {holder.version}'s AP {held_ap:.4f}")
    if promoted:
        client.set_registered_model_alias(name, alias, version.version)
    client.set_model_version_tag(name, version.version, f"{alias}_decision", decision)
    client.set_tag(eval_run_id, f"registry.{alias}_decision", decision)
    log.info("%s: %s", name, decision)
    champion = version if promoted else holder
    return Registration(name=name, version=str(version.version), alias=alias, promoted=promoted, decision=decision,
                        champion_version=str(champion.version) if champion is not None else None)


def _float(text: Optional[str]) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")

