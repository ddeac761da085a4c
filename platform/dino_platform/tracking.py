"""MLflow tracking: one run per training job, written by the driver (params, curves) and rank 0 (metrics).

The driver opens the run before the workers start and passes its id down; only worker rank 0 logs
step metrics and evaluation results to it. A resumed job (same storage path and run name) finds
its earlier MLflow run by tag and continues it, so a job keeps one run however often it restarts.

Tracking URI: ``tracking.tracking_uri`` in the config, else ``$MLFLOW_TRACKING_URI``, else a SQLite
file ``mlflow.db`` under the local run directory (artifacts beside it in ``mlartifacts/``).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Tuple

from dino_platform.drawing import plot_curves

log = logging.getLogger(__name__)

RUN_KEY_TAG = "dino.run_key"


@dataclass(frozen=True)
class TrackingTarget:
    """Where rank 0 logs: passed from the driver to the workers (plain strings, picklable)."""

    tracking_uri: str
    run_id: str


def resolve_tracking_uri(configured: Optional[str], local_run_dir: Path) -> str:
    """``configured``, else ``$MLFLOW_TRACKING_URI``, else a SQLite file ``mlflow.db`` in ``local_run_dir``."""
    if configured or os.environ.get("MLFLOW_TRACKING_URI"):
        return configured or os.environ["MLFLOW_TRACKING_URI"]
    local_run_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{local_run_dir.resolve() / 'mlflow.db'}"


def start_or_resume_run(
    tracking_uri: str,
    experiment: str,
    run_key: str,
    run_name: str,
    params: Mapping[str, str],
    config_yaml: str,
    artifact_dir: Optional[Path] = None,
) -> TrackingTarget:
    """Create (or find, by ``run_key``) the job's MLflow run (:func:`find_or_create_run`); a resumed run
    gets this start's config as ``config_resume_<n>.yaml`` (its params stay those of the first start)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        local = artifact_dir is not None and tracking_uri.startswith("sqlite:")
        client.create_experiment(experiment, artifact_location=artifact_dir.resolve().as_uri() if local else None)
    run_id, created = find_or_create_run(tracking_uri, experiment, run_key, run_name, params, config_yaml)
    if created:
        log.info("MLflow run %s (%s)", run_id, tracking_uri)
    else:
        client.update_run(run_id, status="RUNNING")
        starts = len([a for a in client.list_artifacts(run_id) if a.path.startswith("config")])
        client.log_text(run_id, config_yaml, f"config_resume_{starts}.yaml")
        log.info("continuing MLflow run %s (%s)", run_id, tracking_uri)
    return TrackingTarget(tracking_uri, run_id)


def find_or_create_run(tracking_uri: str, experiment: str, run_key: str, run_name: str, params: Mapping[str, str],
                       config_yaml: str, tags: Optional[Mapping[str, str]] = None) -> Tuple[str, bool]:
    """``(run id, created)``: the run tagged ``run_key`` in ``experiment``, or a new one with ``tags``,
    ``params`` (logged once: MLflow refuses to change a param) and ``config.yaml``."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    escaped = run_key.replace("'", "\\'")
    existing = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{escaped}'", max_results=1)
    if existing:
        return existing[0].info.run_id, False
    run_id = client.create_run(experiment_id, run_name=run_name,
                               tags={RUN_KEY_TAG: run_key, **(tags or {})}).info.run_id
    items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])
    client.log_text(run_id, config_yaml, "config.yaml")
    return run_id, True


class MetricsLogger:
    """Rank 0's handle on the run: step metrics, evaluation summaries, artifacts."""

    def __init__(self, target: TrackingTarget):
        from mlflow import MlflowClient

        self.target = target
        self.client = MlflowClient(target.tracking_uri)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.target.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.target.run_id, data, artifact_file)

    def log_image(self, image, artifact_file: str) -> None:
        self.client.log_image(self.target.run_id, image, artifact_file=artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.target.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def finish_run(target: TrackingTarget, status: str = "FINISHED") -> None:
    """Draw loss and AP curves from the logged history, attach them, and close the run."""
    from mlflow import MlflowClient

    client = MlflowClient(target.tracking_uri)
    history = {name: [(m.step, m.value) for m in client.get_metric_history(target.run_id, name)]
               for name in sorted(client.get_run(target.run_id).data.metrics)}
    terms = {k: v for k, v in history.items() if k.startswith("loss_")}
    aps = {k: v for k, v in history.items() if k.startswith("eval/AP") and "/class_" not in k}
    if "loss" in history:
        panels = {"weighted training loss": {"loss": history["loss"]}}
        if terms:
            panels["unweighted loss terms"] = terms
        client.log_figure(target.run_id, plot_curves(panels), "curves/loss.png")
    if aps:
        client.log_figure(target.run_id, plot_curves({"COCO AP": aps}), "curves/ap.png")
    client.set_terminated(target.run_id, status=status)
