"""The stages after training: evaluate (COCO AP, an MLflow run), register (a registry version +
the champion decision), predict (drawn PNGs + JSON from the registered model) and infer (batch
inference on Ray Data: Parquet detections + manifest)."""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict, List, Tuple

from dino_platform.errors import DataError, StorageError
from dino_platform.pipeline.context import Executor, StageContext, weights_identity, weights_source
from dino_platform.pipeline.spec import EvaluateStage, InferStage, PredictStage, RegisterStage, stage_config_dict
from dino_platform.pipeline.state import fingerprint
from dino_platform.storage import resolve

log = logging.getLogger("dino.pipeline")


# ---------------------------------------------------------------------------------------------
# evaluate


def _evaluate_fingerprint(ctx: StageContext, name: str, stage: EvaluateStage) -> str:
    return fingerprint("evaluate", stage_config_dict(stage), ctx.dataset_digest(stage.data),
                       weights_identity(ctx, stage.checkpoint))


def _evaluate_run(ctx: StageContext, name: str, stage: EvaluateStage, fp: str):
    from dino_platform.evaluation.runner import run_evaluation
    from dino_platform.train.checkpoint import read_train_config

    checkpoint, lineage = weights_source(ctx, stage.checkpoint)
    recorded = read_train_config(checkpoint) or {}
    model = dict(recorded.get("model") or {})
    transform = (recorded.get("data") or {}).get("transform") or {}
    if stage.checkpoint.model:  # a registered version records its model beside the weights
        from dino_platform.registry.models import CONFIG_FILE

        config = json.loads(resolve(checkpoint.rsplit("/", 1)[0]).child(CONFIG_FILE).read_bytes())
        model = {"preset": config["preset"], "num_classes": config["num_classes"], "overrides": config["overrides"]}
        transform = config.get("transform", {})
    if stage.model is not None:
        model = {"preset": stage.model.preset, "num_classes": stage.model.num_classes,
                 "overrides": dict(stage.model.overrides)}
    if stage.transform is not None:
        transform = dict(stage.transform)
    if not model:
        raise DataError(f"stages.{name}.model: {checkpoint} does not record its model (no train_config.json "
                        "beside it, e.g. an official .pth); give model: {preset: ..., num_classes: ...}")
    model_section = {k: model[k] for k in ("preset", "num_classes", "overrides") if k in model}
    r = stage.resources
    data_uri = ctx.spec.shards_uri(stage.data)
    log.info("stage %s: COCO evaluation of %s on %s", name, checkpoint, data_uri)
    result = run_evaluation(checkpoint, data_uri, num_workers=r.workers or 1, batch_size=stage.batch_size,
                            detections_per_image=stage.detections_per_image, max_dets=stage.max_dets,
                            engine=stage.engine, model=model_section, transform=transform,
                            use_gpu=r.gpus_per_worker > 0, cpus_per_worker=r.cpus_per_worker or 0.5)
    stats = result["stats"]
    lineage = {**lineage, "datasets": {**lineage.get("datasets", {}), stage.data: ctx.dataset_digest(stage.data)},
               "configs": {**lineage.get("configs", {}), name: fingerprint(stage_config_dict(stage))}}
    run_id = _log_evaluation(ctx, name, stage, checkpoint, result, lineage, fp)
    log.info("stage %s: AP %.4f AP50 %.4f (MLflow run %s)", name, stats["AP"], stats["AP50"], run_id)
    outputs = {"checkpoint": checkpoint, "metrics": stats, "run_id": run_id, "model": model_section,
               "transform": transform, "data": stage.data, "lineage": lineage, "protocol": result["protocol"]}
    return outputs, {"AP": stats["AP"], "AP50": stats["AP50"]}


def _log_evaluation(ctx: StageContext, name: str, stage: EvaluateStage, checkpoint: str, result: Dict[str, Any],
                    lineage: Dict[str, Any], fp: str) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from dino_platform.evaluation.coco_eval import protocol_tags

    client = MlflowClient(ctx.tracking_uri)
    experiment = client.get_experiment_by_name(ctx.spec.experiment)
    producers = [run for run in lineage.get("runs", {}).values() if run]
    tags = {"dino.pipeline": ctx.spec.name, "dino.stage": name, "dino.fingerprint": fp, "checkpoint": checkpoint,
            "data": stage.data, "git_commit": ctx.git_commit,
            **{f"parent_run.{s}": run for s, run in lineage.get("runs", {}).items() if run},
            **{f"data_digest.{d}": digest for d, digest in lineage.get("datasets", {}).items()},
            **protocol_tags(result["protocol"])}
    if producers:
        tags["mlflow.parentRunId"] = producers[-1]  # shown nested under the run that trained the checkpoint
    run = client.create_run(experiment.experiment_id, run_name=f"{name}-{fp[:10]}", tags=tags)
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in result["stats"].items()])
    client.log_dict(run.info.run_id, result, "coco_eval.json")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _evaluate_outputs_exist(ctx: StageContext, outputs: Dict[str, Any]) -> bool:
    return _run_exists(ctx, outputs.get("run_id"))


def _run_exists(ctx: StageContext, run_id) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        MlflowClient(ctx.tracking_uri).get_run(run_id)
        return True
    except MlflowException:
        return False


# ---------------------------------------------------------------------------------------------
# register


def _register_fingerprint(ctx: StageContext, name: str, stage: RegisterStage) -> str:
    config = stage_config_dict(stage)
    if not config["export"]:  # specs written before register.export existed keep their fingerprint
        del config["export"]
    return fingerprint("register", config, ctx.fingerprints[stage.evaluation])


def _register_run(ctx: StageContext, name: str, stage: RegisterStage, fp: str):
    from dino_platform.data.manifest import read_manifest
    from dino_platform.registry.models import register_evaluated

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
    categories = read_manifest(ctx.spec.shards_uri(evaluation["data"])).categories
    registration = register_evaluated(
        ctx.tracking_uri, stage.model_name, stage.alias, evaluation["run_id"], evaluation["checkpoint"],
        evaluation["model"], evaluation["transform"], categories, evaluation["metrics"], tags,
        protocol=evaluation.get("protocol"))
    exports = {fmt: _attach_export(ctx, registration, evaluation["run_id"], fmt) for fmt in stage.export}
    outputs = {"model_name": registration.name, "version": registration.version, "alias": registration.alias,
               "version_uri": registration.version_uri, "alias_uri": registration.alias_uri,
               "champion_version": registration.champion_version, "promoted": registration.promoted,
               "decision": registration.decision, "AP": evaluation["metrics"]["AP"],
               "AP50": evaluation["metrics"]["AP50"], "exports": exports}
    return outputs, {"version": registration.version, "decision": registration.decision}


def _attach_export(ctx: StageContext, registration, eval_run_id: str, fmt: str) -> str:
    """Export the registered version (``register.export: [onnx]``) into its artifact directory, once.

    The file lands next to ``weights.pt`` (``runs:/<eval run>/model/model.onnx``) and the version is
    tagged ``export.onnx`` with that URI; a version that already has it is not exported again.
    """
    import tempfile
    from pathlib import Path

    from mlflow import MlflowClient

    from dino_platform.registry.export import ONNX_FILE, export_model
    from dino_platform.registry.models import MODEL_DIR

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


def _register_outputs_exist(ctx: StageContext, outputs: Dict[str, Any]) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(ctx.tracking_uri, registry_uri=ctx.tracking_uri).get_model_version(
            outputs["model_name"], outputs["version"])
        return True
    except (MlflowException, KeyError):
        return False


# ---------------------------------------------------------------------------------------------
# predict


def _predict_model(ctx: StageContext, stage) -> Tuple[str, Dict[str, Any]]:
    """(model reference for load_detector, what identifies it) of a predict stage."""
    ref = stage.model
    if ref.stage and ctx.spec.stages[ref.stage].kind == "register":
        from dino_platform.registry.models import resolve_version

        uri = ctx.outputs[ref.stage]["alias_uri"]
        version = resolve_version(uri, ctx.tracking_uri)
        return uri, {"model": uri, "version": version.version}
    if ref.stage:
        return ctx.outputs[ref.stage]["checkpoint"], weights_identity(ctx, ref)
    if ref.uri:
        return ref.uri, weights_identity(ctx, ref)
    return ref.model, weights_identity(ctx, ref)


def _predict_fingerprint(ctx: StageContext, name: str, stage: PredictStage) -> str:
    _, identity = _predict_model(ctx, stage)
    data = ctx.dataset_digest(stage.dataset) if stage.dataset else None
    return fingerprint("predict", stage_config_dict(stage), identity, data)


def _predict_run(ctx: StageContext, name: str, stage: PredictStage, fp: str):
    from dino_platform.registry.predict import load_detector, predict_to_directory

    model_ref, identity = _predict_model(ctx, stage)
    if stage.dataset:
        images = first_images(ctx.spec.shards_uri(stage.dataset), stage.limit)
    else:
        images = [(uri.rstrip("/").rsplit("/", 1)[-1], resolve(uri).read_bytes()) for uri in stage.images]
    out = stage.out or f"{ctx.spec.output_root.rstrip('/')}/predictions/{name}"
    detector = load_detector(model_ref, tracking_uri=ctx.tracking_uri)
    document = predict_to_directory(detector, images, out, threshold=stage.threshold, max_drawn=stage.max_drawn)
    outputs = {"out": resolve(out).uri, "model": model_ref, "model_identity": identity, "json": document["json"],
               "pngs": [item["png"] for item in document["images"]],
               "drawn": [sum(d["drawn"] for d in item["detections"]) for item in document["images"]]}
    return outputs, {"pngs": outputs["pngs"]}


def first_images(shards_uri: str, limit: int) -> List[Tuple[str, bytes]]:
    """(file name, encoded bytes) of the first ``limit`` images stored in a shard directory."""
    import pyarrow.parquet as pq

    from dino_platform.data.manifest import read_manifest, shard_locations

    images: List[Tuple[str, bytes]] = []
    for location in shard_locations(shards_uri, read_manifest(shards_uri)):
        with location.fs.open_input_file(location.path) as handle:
            table = pq.read_table(handle, columns=["file_name", "image"])
        for row in table.slice(0, limit - len(images)).to_pylist():
            images.append((row["file_name"].rsplit("/", 1)[-1], row["image"]))
        if len(images) >= limit:
            break
    return images


def _predict_outputs_exist(ctx: StageContext, outputs: Dict[str, Any]) -> bool:
    try:
        return all(resolve(uri).exists() for uri in [*outputs["pngs"], outputs["json"]])
    except (StorageError, KeyError):
        return False


# ---------------------------------------------------------------------------------------------
# infer


def _infer_fingerprint(ctx: StageContext, name: str, stage: InferStage) -> str:
    _, identity = _predict_model(ctx, stage)
    if stage.dataset:
        data = ctx.dataset_digest(stage.dataset)
    else:  # the listing: new or changed images under the prefix re-run the stage (finished parts are kept)
        data = fingerprint(sorted(resolve(stage.images).file_sizes().items()))
    return fingerprint("infer", stage_config_dict(stage), identity, data)


def _infer_run(ctx: StageContext, name: str, stage: InferStage, fp: str):
    from dino_platform.infer.job import MANIFEST_FILE, InferConfig, run_inference

    model_ref, identity = _predict_model(ctx, stage)
    out = stage.out or f"{ctx.spec.output_root.rstrip('/')}/detections/{name}"
    manifest = run_inference(InferConfig(
        model=model_ref, out=out, images=stage.images,
        shards=ctx.spec.shards_uri(stage.dataset) if stage.dataset else None, threshold=stage.threshold,
        concurrency=stage.concurrency, batch_size=stage.batch_size, part_size=stage.part_size,
        coco_json=stage.coco_json, cpus_per_actor=stage.cpus_per_actor, use_gpu=stage.use_gpu,
        tracking_uri=ctx.tracking_uri))
    outputs = {"out": resolve(out).uri, "manifest": resolve(out).child(MANIFEST_FILE).uri, "model": model_ref,
               "model_identity": identity, "digest": manifest["digest"], "counts": manifest["counts"]}
    return outputs, {"images": manifest["counts"]["images"], "failed": manifest["counts"]["failed"],
                     "digest": manifest["digest"]}


def _infer_outputs_exist(ctx: StageContext, outputs: Dict[str, Any]) -> bool:
    try:
        manifest = json.loads(resolve(outputs["manifest"]).read_bytes())
        return manifest.get("digest") == outputs["digest"]
    except (StorageError, KeyError, ValueError):
        return False


EVALUATE = Executor(_evaluate_fingerprint, _evaluate_run, _evaluate_outputs_exist)
REGISTER = Executor(_register_fingerprint, _register_run, _register_outputs_exist)
PREDICT = Executor(_predict_fingerprint, _predict_run, _predict_outputs_exist)
INFER = Executor(_infer_fingerprint, _infer_run, _infer_outputs_exist)
