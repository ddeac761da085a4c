"""MLflow tracking: one run per training job, written by the driver (params, curves) and rank 0 (metrics).

The driver opens the run before the workers start and passes its id down; only worker rank 0 logs
step metrics and evaluation results to it. A resumed job (same storage path and run name) finds
its earlier MLflow run by tag and continues it, so a job keeps one run however often it restarts.

Tracking URI: ``tracking.tracking_uri`` in the config, else ``$MLFLOW_TRACKING_URI``, else a SQLite
file ``mlflow.db`` under the local run directory (artifacts beside it in ``mlartifacts/``).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

RUN_KEY_TAG = "dino.run_key"


@dataclass(frozen=True)
class TrackingTarget:
    """Where rank 0 logs: passed from the driver to the workers (plain strings, picklable)."""

    tracking_uri: str
    run_id: str


def resolve_tracking_uri(configured: Optional[str], local_run_dir: Path) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
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
    """Create (or find, by ``run_key``) the job's MLflow run; log params and the resolved config.

    Params are logged once, when the run is created: MLflow refuses to change a param's value,
    and a resumed job may legitimately differ (e.g. ``optim.max_steps``); each start's full config is
    logged as an artifact instead (``config.yaml``, then ``config_resume_<n>.yaml``).
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        location = artifact_dir.resolve().as_uri() if artifact_dir is not None and tracking_uri.startswith("sqlite:") else None
        client.create_experiment(experiment, artifact_location=location)
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
    run_id = client.create_run(experiment_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **(tags or {})}).info.run_id
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
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.target.run_id, metrics=items)

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
    run = client.get_run(target.run_id)
    names = sorted(run.data.metrics)
    history = {name: [(m.step, m.value) for m in client.get_metric_history(target.run_id, name)] for name in names}
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


def plot_curves(panels: Mapping[str, Mapping[str, Sequence[Tuple[int, float]]]]):
    """One panel per title, one line per series against the optimizer step (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6 * len(panels), 4), dpi=100)
    for index, (title, series) in enumerate(panels.items()):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for name, points in sorted(series.items()):
            points = sorted(points)
            axes.plot([s for s, _ in points], [v for _, v in points], label=name,
                      marker="." if len(points) < 20 else None)
        axes.set_xlabel("optimizer step")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        if 1 < len(series) <= 12:
            axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


# Distinct, saturated colours (one per class id, cycled): a class keeps its colour across images.
_BOX_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))


def draw_detections(image, boxes: Iterable, labels: Iterable, scores: Iterable, names: Mapping[int, str],
                    min_side: int = 480):
    """Boxes (x0, y0, x1, y1 pixels of ``image``) drawn on a copy of a PIL image, labelled 'name 0.87'.

    One colour per class, the label on a filled tab above its box (inside the picture when the box
    touches the top edge), the highest score drawn last so it stays on top. A picture whose short
    side is below ``min_side`` is enlarged by a whole factor first (boxes scaled with it) so that
    small inputs (the synthetic demo's 160x120) stay legible; the returned image is that size.
    """
    from PIL import Image, ImageDraw, ImageFont

    canvas = image.convert("RGB")  # a new image: the caller's stays untouched
    factor = max(1, math.ceil(min_side / max(1, min(canvas.size))))
    if factor > 1:
        canvas = canvas.resize((canvas.size[0] * factor, canvas.size[1] * factor), Image.BICUBIC)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(11, min(canvas.size) // 32))
    width = max(2, min(canvas.size) // 200)
    entries = sorted(zip(boxes, labels, scores), key=lambda e: float(e[2]))
    for box, label, score in entries:
        x0, y0, x1, y1 = (float(v) * factor for v in box)
        colour = _BOX_COLOURS[int(label) % len(_BOX_COLOURS)]
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        text = f"{names.get(int(label), int(label))} {float(score):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tab_w, tab_h = right - left + 4, bottom - top + 4
        tx, ty = min(max(0.0, x0), max(0.0, canvas.size[0] - tab_w)), y0 - tab_h
        if ty < 0:
            ty = max(0.0, y0)
        draw.rectangle([tx, ty, tx + tab_w, ty + tab_h], fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((tx + 2 - left, ty + 2 - top), text, font=font,
                  fill=(0, 0, 0) if luminance > 140 else (255, 255, 255))
    return canvas
