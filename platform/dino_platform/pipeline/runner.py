"""Run a pipeline: connect to Ray, check everything, then each stage in order (or skip it).

    result = run_pipeline(load_spec("pipelines/o365_pretrain_coco_ft.yaml", preset="smoke"))
    print(result.summary())

A stage is skipped when its fingerprint matches the state file's record, the record says done and
its outputs still exist; otherwise it runs. A training stage that was interrupted runs again with
the same run directory, and the trainer continues from its last checkpoint there.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

from dino_platform.pipeline.context import Executor, StageContext
from dino_platform.pipeline.model_stages import EVALUATE, PREDICT, REGISTER
from dino_platform.pipeline.preflight import connect_ray, preflight
from dino_platform.pipeline.spec import PipelineSpec
from dino_platform.pipeline.stages import INGEST, TRAIN
from dino_platform.pipeline.state import PipelineState

log = logging.getLogger("dino.pipeline")

EXECUTORS: Dict[str, Executor] = {"ingest": INGEST, "train": TRAIN, "evaluate": EVALUATE, "register": REGISTER,
                                  "predict": PREDICT}


@dataclass
class PipelineResult:
    spec: PipelineSpec
    state_uri: str
    tracking_uri: str
    outputs: Dict[str, Dict[str, Any]]
    actions: Dict[str, Dict[str, Any]]
    seconds: float

    def summary(self) -> str:
        """Where to look: state file, checkpoints, registry, predictions, and the MLflow UI command."""
        spec = self.spec
        lines = [f"pipeline {spec.name}{f' (preset {spec.preset})' if spec.preset else ''} finished in "
                 f"{self.seconds:.0f} s: " + ", ".join(f"{n} {a['action']}" for n, a in self.actions.items())]
        lines.append(f"  state file:   {self.state_uri}")
        for name, out in self.outputs.items():
            kind = spec.stages[name].kind
            if kind == "train":
                restarts = ""
                if out.get("restarts"):
                    sizes = " -> ".join(map(str, out.get("world_sizes") or []))
                    restarts = f"  ({out['restarts']} restarts, {out.get('resizes', 0)} resizes: workers {sizes})"
                lines.append(f"  {name + ':':<13} {out['checkpoint']}{restarts}")
            elif kind == "evaluate":
                m = out["metrics"]
                lines.append(f"  {name + ':':<13} AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}  (MLflow run {out['run_id']})")
            elif kind == "register":
                lines.append(f"  {name + ':':<13} {out['version_uri']} (AP {out['AP']:.4f}); @{out['alias']} -> "
                             f"version {out['champion_version']} ({out['decision']})")
            elif kind == "predict":
                lines.append(f"  {name + ':':<13} {out['out']}  ({', '.join(Path(p).name for p in out['pngs'])}, "
                             "detections.json)")
        lines.append(f"  MLflow:       {self.tracking_uri} (experiment {spec.experiment})")
        if self.tracking_uri.startswith("sqlite:"):
            mlflow_bin = Path(sys.executable).parent / "mlflow"
            command = str(mlflow_bin) if mlflow_bin.exists() else "mlflow"
            lines.append(f"  MLflow UI:    {command} ui --backend-store-uri {self.tracking_uri} --host 127.0.0.1 "
                         "--port 5000   # then open http://127.0.0.1:5000")
        registered = [o for n, o in self.outputs.items() if spec.stages[n].kind == "register"]
        if registered:
            lines.append(f"  try it:       MLFLOW_TRACKING_URI={self.tracking_uri} dino predict --model "
                         f"{registered[-1]['alias_uri']} IMAGE... --out predictions/")
        return "\n".join(lines)


def run_pipeline(spec: PipelineSpec) -> PipelineResult:
    """Check the cluster and inputs, then run (or skip) each stage in order; raise on the first failure."""
    from dino_platform.registry.models import git_commit

    started = time.time()
    where = connect_ray(spec)
    _warn_if_output_is_temporary(spec)
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
    return PipelineResult(spec=spec, state_uri=state.uri, tracking_uri=ctx.tracking_uri, outputs=ctx.outputs,
                          actions=state.run["actions"], seconds=time.time() - started)


def _run_stage(ctx: StageContext, name: str, stage) -> None:
    executor = EXECUTORS[stage.kind]
    fp = executor.fingerprint(ctx, name, stage)
    record = ctx.state.stage(name) or {}
    if record.get("fingerprint") == fp and record.get("status") == "done" and \
            executor.outputs_exist(ctx, record["outputs"]):
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
        outputs, details = executor.run(ctx, name, stage, fp)
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

    from dino_platform.storage import resolve

    client = MlflowClient(ctx.tracking_uri)
    if client.get_experiment_by_name(ctx.spec.experiment) is None:
        location = None
        if ctx.tracking_uri.startswith("sqlite:") and ctx.spec.output_is_local:
            location = Path(resolve(ctx.spec.output_root).path, "mlartifacts").as_uri()
        client.create_experiment(ctx.spec.experiment, artifact_location=location)


def _warn_if_output_is_temporary(spec: PipelineSpec) -> None:
    given = str(spec.raw.get("output_root", ""))
    relative = "://" not in given and not os.path.isabs(os.path.expanduser(given))
    if relative and os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        log.warning("output_root %s is relative: inside `ray job submit` that is the job's temporary copy of "
                    "the working directory; pass --set output_root=/absolute/path (or s3://...) to keep results",
                    spec.output_root)
