"""Run a pipeline: connect to Ray, check everything, then each stage in order (or skip it).

    result = run_pipeline(load_spec("pipelines/o365_pretrain_coco_ft.yaml", preset="smoke"))
    print(result.summary())

A stage is skipped when its fingerprint matches the state file's record, the record says done and
its outputs still exist. An interrupted training stage runs again in the same run directory and
continues from its last checkpoint there.
"""
from __future__ import annotations

import io
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from dino_platform.drawing import plot_curves
from dino_platform.pipeline.context import StageContext
from dino_platform.pipeline.preflight import preflight
from dino_platform.pipeline.spec import PipelineSpec
from dino_platform.pipeline.stages import KINDS
from dino_platform.pipeline.state import PipelineState
from dino_platform.ray_session import connect
from dino_platform.registry.models import git_commit
from dino_platform.storage import in_submitted_ray_job, resolve

log = logging.getLogger("dino.pipeline")

@dataclass
class PipelineResult:
    spec: PipelineSpec
    state_uri: str
    tracking_uri: str
    outputs: Dict[str, Dict[str, Any]]
    actions: Dict[str, Dict[str, Any]]
    seconds: float
    curves_png: Optional[str] = None  # loss and validation AP of every training stage, one timeline

    def summary(self) -> str:
        """Where to look: state file, checkpoints, registry, predictions, and the MLflow UI command."""
        spec = self.spec
        lines = [f"pipeline {spec.name}{f' (preset {spec.preset})' if spec.preset else ''} finished in "
                 f"{self.seconds:.0f} s: " + ", ".join(f"{n} {a['action']}" for n, a in self.actions.items())]
        lines.append(f"  state file:   {self.state_uri}")
        for name, out in self.outputs.items():
            line = KINDS[spec.stages[name].kind].summary(out)
            if line is not None:
                lines.append(f"  {name + ':':<13} {line}")
        lines.append(f"  MLflow:       {self.tracking_uri} (experiment {spec.experiment})")
        if self.tracking_uri.startswith("sqlite:"):
            mlflow_bin = Path(sys.executable).parent / "mlflow"
            command = str(mlflow_bin) if mlflow_bin.exists() else "mlflow"
            lines.append(f"  MLflow UI:    {command} ui --backend-store-uri {self.tracking_uri} --host 127.0.0.1 "
                         "--port 5000   # then open http://127.0.0.1:5000")
        registered = [o for o in self.outputs.values() if "alias_uri" in o]
        if registered:
            lines.append(f"  try it:       MLFLOW_TRACKING_URI={self.tracking_uri} dino predict --model "
                         f"{registered[-1]['alias_uri']} IMAGE... --out predictions/")
        # the last lines: the result, and the picture of how training got there
        evaluated = [(n, o["metrics"]) for n, o in self.outputs.items() if "metrics" in o]
        for name, m in evaluated[-1:]:
            lines.append(f"result ({name}): AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}")
        if self.curves_png:
            lines.append(f"training curves: {self.curves_png}")
        return "\n".join(lines)


def run_pipeline(spec: PipelineSpec) -> PipelineResult:
    """Check the cluster and inputs, then run (or skip) each stage in order; raise on the first failure."""
    started = time.time()
    where = connect(spec.ray.address, num_cpus=spec.ray.num_cpus)
    _note_where_output_goes(spec)
    capacity = preflight(spec)  # everything that can fail before work starts
    log.info("pipeline %s on %s (%s); output root %s", spec.name, where,
             ", ".join(f"{k} {v:g}" for k, v in sorted(capacity.items()) if k in ("CPU", "GPU")), spec.output_root)
    state = PipelineState(spec.state_uri, spec.name)
    ctx = StageContext(spec=spec, state=state, tracking_uri=spec.tracking_uri(), git_commit=git_commit())
    _ensure_experiment(ctx)
    state.begin_run(preset=spec.preset, spec=spec.source, git_commit=ctx.git_commit, resolved_spec=spec.raw)
    try:
        for name, stage in spec.stages.items():
            _run_stage(ctx, name, stage)
    except BaseException as exc:
        state.end_run("interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "failed")
        raise
    state.end_run("done")
    curves = _training_curves(ctx)
    return PipelineResult(spec=spec, state_uri=state.uri, tracking_uri=ctx.tracking_uri, outputs=ctx.outputs,
                          actions=state.run["actions"], seconds=time.time() - started, curves_png=curves)


def _training_curves(ctx: StageContext) -> Optional[str]:
    """``<output_root>/training_curves.png`` (and ``curves/pipeline.png`` in the last training stage's MLflow run):
    loss and validation AP of the training stages on one step axis; None without training stages."""
    from mlflow import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    losses: Dict[str, list] = {}
    aps: Dict[str, list] = {}
    offset, last_run = 0, None
    for name, out in ctx.outputs.items():
        if ctx.spec.stages[name].kind != "train" or not out.get("run_id"):
            continue
        history = {metric: [(m.step + offset, m.value) for m in client.get_metric_history(out["run_id"], metric)]
                   for metric in ("loss", "eval/AP", "eval/AP50")}
        losses[name] = history["loss"]
        for metric in ("eval/AP", "eval/AP50"):
            if history[metric]:
                aps[f"{name} {metric[5:]}"] = history[metric]
        offset = max([offset] + [s for s, _ in history["loss"]])
        last_run = out["run_id"]
    if last_run is None:
        return None
    panels = {"training loss (weighted)": losses}
    if aps:
        panels["validation COCO AP"] = aps
    figure = plot_curves(panels)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    target = resolve(ctx.spec.output_root).child("training_curves.png")
    target.write_bytes(buffer.getvalue())
    client.log_figure(last_run, figure, "curves/pipeline.png")
    return target.uri


def _run_stage(ctx: StageContext, name: str, stage) -> None:
    kind = KINDS[stage.kind]
    fp = kind.fingerprint(ctx, name, stage)
    record = ctx.state.stage(name) or {}
    if record.get("fingerprint") == fp and record.get("status") == "done" and \
            kind.outputs_exist(ctx, record["outputs"]):
        log.info("stage %s: skipped (fingerprint %s matches a finished run; outputs exist)", name, fp[:12])
        ctx.state.note(name, "skipped", fingerprint=fp)
        ctx.outputs[name], ctx.fingerprints[name] = record["outputs"], fp
        return
    if not record:
        reason = "first run"
    elif record.get("fingerprint") != fp:
        reason = "config or inputs changed"
    elif record.get("status") != "done":
        reason = f"{record.get('status')} before"  # running (killed), interrupted or failed
    else:
        reason = "its outputs are gone"
    log.info("stage %s (%s): running (%s; fingerprint %s)", name, stage.kind, reason, fp[:12])
    ctx.state.start_stage(name, fp)
    ctx.fingerprints[name] = fp
    started = time.time()
    try:
        outputs, details = kind.run(ctx, name, stage, fp)
    except BaseException as exc:
        # `ray job stop` and Ctrl-C arrive as SystemExit / KeyboardInterrupt: interrupted, not failed
        status = "interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "failed"
        ctx.state.fail_stage(name, f"{type(exc).__name__}: {exc}", status=status)
        ctx.state.note(name, status, error=f"{type(exc).__name__}: {exc}"[:500], seconds=time.time() - started)
        raise
    ctx.state.finish_stage(name, outputs)
    action = details.pop("action", "ran")
    ctx.state.note(name, action, fingerprint=fp, reason=reason, seconds=round(time.time() - started, 1), **details)
    ctx.outputs[name] = outputs
    log.info("stage %s: %s in %.0f s", name, action, time.time() - started)


def _ensure_experiment(ctx: StageContext) -> None:
    """Create the MLflow experiment; with a local SQLite store its artifacts live under the output root."""
    from mlflow import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    if client.get_experiment_by_name(ctx.spec.experiment) is None:
        location = None
        if ctx.tracking_uri.startswith("sqlite:") and ctx.spec.output_is_local:
            location = Path(resolve(ctx.spec.output_root).path, "mlartifacts").as_uri()
        client.create_experiment(ctx.spec.experiment, artifact_location=location)


def _note_where_output_goes(spec: PipelineSpec) -> None:
    given = str(spec.raw.get("output_root", ""))
    relative = "://" not in given and not os.path.isabs(os.path.expanduser(given))
    if relative and in_submitted_ray_job():
        log.info("output_root %s is relative and this is a submitted Ray job: results go to %s ($DINO_HOME, "
                 "default ~/.dino), not into Ray's temporary copy of the working dir; on a multi-node "
                 "cluster pass --set output_root=s3://... so every node writes to the same place",
                 given, spec.output_root)
