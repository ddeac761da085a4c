"""The data and training stages: ingest (only where shards are missing) and train (resumable)."""
from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
from typing import Any, Dict, Optional, Tuple

from dino_platform.errors import DataError, StorageError
from dino_platform.pipeline.context import Executor, StageContext, weights_identity, weights_source
from dino_platform.pipeline.spec import IngestStage, PipelineSpec, TrainStage, stage_config_dict
from dino_platform.pipeline.state import fingerprint
from dino_platform.storage import resolve

log = logging.getLogger("dino.pipeline")


# ---------------------------------------------------------------------------------------------
# ingest: raw data (or `dino synth`) -> shards, only where shards are missing


def _ingest_fingerprint(ctx: StageContext, name: str, stage: IngestStage) -> str:
    spec = ctx.spec
    return fingerprint("ingest", stage_config_dict(stage),
                       {d: [dataclasses.asdict(spec.datasets[d]), spec.shards_uri(d)] for d in stage.datasets})


def _ingest_run(ctx: StageContext, name: str, stage: IngestStage, fp: str):
    from dino_platform.data.ingest import IngestConfig, ingest

    spec, done, built = ctx.spec, {}, []
    for dataset in stage.datasets:
        ds = spec.datasets[dataset]
        shards = spec.shards_uri(dataset)
        if ds.synth is not None:
            _synthesize(spec, dataset)
        annotations, images = spec.annotations_uri(dataset), spec.images_uri(dataset)
        # NOTE: synthetic annotations are small and may have been regenerated: `ingest` compares their
        # content. Real ones can be many GB: complete shards of the same URIs are trusted without
        # reading them (a file changed in place at the same URI needs its shards deleted).
        before = _complete_ingest(shards, annotations, ds.shard_size)
        manifest = None if ds.synth is not None else before
        if manifest is None:
            log.info("stage %s: ingesting %s -> %s", name, dataset, shards)
            manifest = ingest(IngestConfig(format=ds.format, annotations_uri=annotations, images_uri=images,
                                           out_uri=shards, shard_size=ds.shard_size, parallel=stage.parallel))
            if before is None or manifest.digest != before.digest:
                built.append(dataset)
        else:
            log.info("stage %s: %s already has complete shards at %s", name, dataset, shards)
        ctx.forget_digest(dataset)
        done[dataset] = {"shards": shards, "digest": manifest.digest, "images": manifest.images,
                         "quarantined": len(manifest.quarantined)}
    return {"datasets": done}, {"ingested": built}


def _complete_ingest(shards: str, annotations: str, shard_size: int):
    """The manifest of ``shards`` when it is a finished ingest of ``annotations`` at ``shard_size``; else None."""
    from dino_platform.data.manifest import verify_shards

    try:
        manifest = verify_shards(shards)
    except (DataError, StorageError):
        return None
    if manifest.source.get("annotations") != resolve(annotations).uri or manifest.shard_size != shard_size:
        return None
    return manifest


def _synthesize(spec: PipelineSpec, dataset: str) -> None:
    """Generate the synthetic raw data once (``synth.json`` records what was generated)."""
    from dino_platform.data.synth import SynthConfig, generate

    s = spec.datasets[dataset].synth
    wanted = {"kind": s.kind, "images": s.images, "seed": s.seed, "size": list(s.size)}
    root = resolve(spec.raw_uri(dataset))
    marker = root.child("synth.json")
    if marker.exists() and json.loads(marker.read_bytes()) == wanted and root.child("annotations.json").exists():
        return
    log.info("generating synthetic %s data for %s (%d images) in %s", s.kind, dataset, s.images, root.uri)
    generate(SynthConfig(kind=s.kind, images=s.images, seed=s.seed, size=tuple(s.size)), root.uri)
    marker.write_bytes(json.dumps(wanted).encode())


def _ingest_outputs_exist(ctx: StageContext, outputs: Dict[str, Any]) -> bool:
    from dino_platform.data.manifest import verify_shards

    try:
        return all(verify_shards(o["shards"]).digest == o["digest"] for o in outputs.get("datasets", {}).values())
    except (DataError, StorageError):
        return False


# ---------------------------------------------------------------------------------------------
# train: run_training on the stage's `dino train` config; the trainer resumes from the run's checkpoints


def _train_identity(cfg_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The parts of a TrainConfig that decide the trained weights (not where they or the logs go)."""
    d = json.loads(json.dumps(cfg_dict))
    for key in ("name", "storage_path", "max_failures"):
        d["run"].pop(key, None)
    d.pop("tracking", None)
    d["model"].pop("init_from", None)
    return d


def _train_fingerprint(ctx: StageContext, name: str, stage: TrainStage) -> str:
    identity = _train_identity(ctx.spec.train_config(name).to_dict())
    data = {"train": ctx.dataset_digest(stage.train_data),
            "eval": ctx.dataset_digest(stage.eval_data) if stage.eval_data else None}
    init = weights_identity(ctx, stage.init.source()) if stage.init is not None else None
    return fingerprint("train", identity, data, init)


def _train_run(ctx: StageContext, name: str, stage: TrainStage, fp: str):
    from dino_platform.train.trainer import run_training

    spec = ctx.spec
    lineage = {"runs": {}, "datasets": {}, "configs": {}}
    init_from = None
    if stage.init is not None:
        init_from, lineage = weights_source(ctx, stage.init.source())
    run_name = f"{name}-{fp[:10]}"  # a changed config or input trains afresh; the same one resumes
    cfg = spec.train_config(name, run_name=run_name, init_from=init_from)
    run_dir = resolve(spec.train_storage).child(run_name)
    resumed = latest_checkpoint(run_dir)
    if resumed is not None:
        log.info("stage %s: continuing %s from its last checkpoint %s (step %d)", name, run_dir.uri, *resumed)
    else:
        log.info("stage %s: training %s from %s", name, run_dir.uri, init_from or "the backbone's initialisation")
    outcome = run_training(cfg)
    if outcome.checkpoint is None:
        raise DataError(f"stage {name}: training finished without a checkpoint in {run_dir.uri}")
    checkpoint = run_dir.child(posixpath.basename(outcome.checkpoint.path.rstrip("/"))).uri
    config_hash = fingerprint(_train_identity(cfg.to_dict()))
    datasets = {stage.train_data: ctx.dataset_digest(stage.train_data)}
    if stage.eval_data:
        datasets[stage.eval_data] = ctx.dataset_digest(stage.eval_data)
    lineage = {"runs": {**lineage["runs"], name: outcome.tracking.run_id if outcome.tracking else None},
               "datasets": {**lineage["datasets"], **datasets},
               "configs": {**lineage["configs"], name: config_hash}}
    metrics = outcome.metrics or {}
    outputs = {"checkpoint": checkpoint, "run_dir": run_dir.uri, "run_id": lineage["runs"][name],
               "step": metrics.get("step"), "config_hash": config_hash, "lineage": lineage,
               # worker-group restarts (lost workers or nodes) and resizes of an elastic group
               "restarts": outcome.restarts, "resizes": outcome.resizes,
               "world_sizes": [g["world_size"] for g in outcome.worker_groups]}
    details = {"action": "resumed", "resumed_from_step": resumed[1], "resumed_from": resumed[0]} if resumed else {}
    return outputs, {**details, "checkpoint": checkpoint, "step": metrics.get("step")}


def latest_checkpoint(run_dir) -> Optional[Tuple[str, int]]:
    """(checkpoint dir name, step) Ray Train will resume ``run_dir`` from, or None for a fresh run."""
    from dino_platform.train.checkpoint import latest_registered_checkpoint

    latest = latest_registered_checkpoint(run_dir)
    if latest is None:
        return None
    return latest["checkpoint_dir_name"], int((latest.get("metrics") or {}).get("step", 0))


def _train_outputs_exist(ctx: StageContext, outputs: Dict[str, Any]) -> bool:
    from dino_platform.train.checkpoint import weights_location

    try:
        weights_location(outputs["checkpoint"])
        return True
    except (StorageError, KeyError):
        return False


INGEST = Executor(_ingest_fingerprint, _ingest_run, _ingest_outputs_exist)
TRAIN = Executor(_train_fingerprint, _train_run, _train_outputs_exist)
