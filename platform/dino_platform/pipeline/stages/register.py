"""Stage kind ``register``: an evaluated checkpoint becomes a registry version; the alias moves only when AP improves."""
from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Literal

from dino_platform.data.manifest import read_manifest
from dino_platform.errors import ConfigError
from dino_platform.evaluation.coco_eval import PROTOCOL_TAG, protocol_tags
from dino_platform.model.artifact import load_artifact
from dino_platform.pipeline.kind import StageKind, holds
from dino_platform.pipeline.spec import NAME_PATTERN
from dino_platform.pipeline.state import fingerprint
from dino_platform.registry.models import MODEL_DIR, register_evaluated

log = logging.getLogger("dino.pipeline")


@dataclass
class RegisterStage:
    kind: str = "register"
    evaluation: str = ""  # an earlier evaluate stage: only evaluated checkpoints are registered
    model_name: str = "dino-coco"
    alias: str = "champion"  # moves to a new version only when its AP beats the alias holder's
    export: List[Literal["onnx"]] = field(default_factory=list)  # exports logged beside the weights (model/model.onnx)


def _validate(scope, name: str, stage: RegisterStage) -> None:
    where = f"stages.{name}"
    if scope.earlier.get(stage.evaluation) != "evaluate":
        scope.missing_stage(f"{where}.evaluation", stage.evaluation, "evaluate", ("metrics",))
    if not stage.model_name or "/" in stage.model_name or "@" in stage.model_name:
        raise ConfigError(f"{where}.model_name: {stage.model_name!r} must be non-empty, without '/' or '@'")
    if not NAME_PATTERN.match(stage.alias) or stage.alias == "latest" or re.fullmatch(r"[vV]\d+", stage.alias):
        raise ConfigError(f"{where}.alias: {stage.alias!r} must be a name like champion "
                          "(not 'latest' or v<number>, which MLflow reserves)")


def _fingerprint(ctx, name: str, stage: RegisterStage) -> str:
    config = asdict(stage)
    if not config["export"]:  # specs written before register.export existed keep their fingerprint
        del config["export"]
    return fingerprint("register", config, ctx.fingerprints[stage.evaluation])


def _run(ctx, name: str, stage: RegisterStage, fp: str):
    evaluation = ctx.outputs[stage.evaluation]
    lineage = evaluation["lineage"]
    tags = {
        "pipeline": ctx.spec.name, "pipeline_fingerprint": fp, "git_commit": ctx.git_commit,
        "config_hash": fingerprint(lineage.get("configs", {})),
        **{f"data_digest.{d}": digest for d, digest in lineage.get("datasets", {}).items()},
        **{f"parent_run.{s}": run for s, run in lineage.get("runs", {}).items() if run},
    }
    if lineage.get("registry"):
        tags["parent_model"] = lineage["registry"]
    registration = register_checkpoint(ctx.tracking_uri, stage.model_name, stage.alias, evaluation,
                                       ctx.spec.shards_uri(evaluation["data"]), tags)
    exports = {fmt: _attach_export(ctx, registration, evaluation["run_id"], fmt) for fmt in stage.export}
    outputs = {"model_name": registration.name, "version": registration.version, "alias": registration.alias,
               "version_uri": registration.version_uri, "alias_uri": registration.alias_uri,
               "champion_version": registration.champion_version, "promoted": registration.promoted,
               "decision": registration.decision, "AP": evaluation["metrics"]["AP"],
               "AP50": evaluation["metrics"]["AP50"], "exports": exports}
    return outputs, {"version": registration.version, "decision": registration.decision}


def register_checkpoint(tracking_uri: str, model_name: str, alias: str, evaluation: Dict[str, Any], data_uri: str,
                        tags: Dict[str, str]):
    """``evaluate.evaluate_checkpoint``'s result as a version: the artifact with the model and transform it was
    evaluated with and the categories of ``data_uri``'s shards; the alias moves only when its AP is better
    (``registry.models.Registration``). The register stage's and the sweep's."""
    if evaluation.get("protocol"):
        tags = {**tags, **protocol_tags(evaluation["protocol"])}
    artifact = replace(load_artifact(evaluation["checkpoint"], **evaluation["model"]), transform=evaluation["transform"],
                       categories=read_manifest(data_uri).categories)
    return register_evaluated(tracking_uri, model_name, alias, evaluation["run_id"], artifact, evaluation["metrics"],
                              tags, compare_on=PROTOCOL_TAG)


def _attach_export(ctx, registration, eval_run_id: str, fmt: str) -> str:
    """Export the registered version (``register.export: [onnx]``) once, next to its ``model.pt``
    (``runs:/<eval run>/model/model.onnx``); the version's tag ``export.onnx`` holds that URI."""
    from mlflow import MlflowClient

    from dino_platform.serving.onnx import ONNX_FILE, export_model

    client = MlflowClient(ctx.tracking_uri, registry_uri=ctx.tracking_uri)
    version = client.get_model_version(registration.name, registration.version)
    uri = f"runs:/{eval_run_id}/{MODEL_DIR}/{ONNX_FILE}"
    if version.tags.get(f"export.{fmt}") == uri:
        log.info("%s: version %s already has its %s export", registration.name, registration.version, fmt)
        return uri
    with tempfile.TemporaryDirectory(prefix="dino-export-") as staging:
        path = Path(staging) / ONNX_FILE
        export_model(registration.version_uri, str(path), fmt=fmt, tracking_uri=ctx.tracking_uri,
                     with_postprocess=True)
        client.log_artifact(eval_run_id, str(path), MODEL_DIR)
    client.set_model_version_tag(registration.name, registration.version, f"export.{fmt}", uri)
    log.info("%s: version %s exported to %s (%s)", registration.name, registration.version, fmt, uri)
    return uri


def _outputs_exist(ctx, outputs: Dict[str, Any]) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(ctx.tracking_uri, registry_uri=ctx.tracking_uri)
    return holds(lambda: client.get_model_version(outputs["model_name"], outputs["version"]), MlflowException, KeyError)


def _summary(out: Dict[str, Any]) -> str:
    return (f"{out['version_uri']} (AP {out['AP']:.4f}); @{out['alias']} -> version {out['champion_version']} "
            f"({out['decision']})")


KIND = StageKind("register", RegisterStage, ("model",), _validate, _fingerprint, _run, _outputs_exist, _summary)
