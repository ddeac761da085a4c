"""Stage kind ``ingest``: raw data (or ``dino synth``) -> shards, only where shards are missing."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List

from dino_platform.data.manifest import verify_shards
from dino_platform.errors import ConfigError, DataError, StorageError
from dino_platform.pipeline.kind import StageKind, holds
from dino_platform.pipeline.spec import DatasetSpec, SynthSpec
from dino_platform.pipeline.state import fingerprint
from dino_platform.storage import resolve

log = logging.getLogger("dino.pipeline")


@dataclass
class IngestStage:
    kind: str = "ingest"
    datasets: List[str] = field(default_factory=list)
    parallel: bool = True  # shards built as Ray tasks


def _validate(scope, name: str, stage: IngestStage) -> None:
    where = f"stages.{name}"
    if not stage.datasets:
        raise ConfigError(f"{where}.datasets: list the datasets to ingest")
    for i, ds in enumerate(stage.datasets):
        scope.dataset(f"{where}.datasets[{i}]", ds, ingested=False)
        if not scope.spec.datasets[ds].has_raw_source:
            raise ConfigError(f"{where}.datasets[{i}]: dataset {ds} has nothing to ingest from; give "
                              f"datasets.{ds}.annotations + images, or datasets.{ds}.synth")


def _preflight(spec, name: str, stage: IngestStage) -> None:
    """The raw sources must exist, unless their shards are already complete."""
    for dataset in stage.datasets:
        ds = spec.datasets[dataset]
        if ds.synth is not None or holds(lambda: verify_shards(spec.shards_uri(dataset)), DataError, StorageError):
            continue
        for key, uri, want_file in (("annotations", ds.annotations, True), ("images", ds.images, False)):
            location = resolve(uri)
            ok = location.is_file() if want_file else bool(location.list_files(recursive=False) or location.exists())
            if not ok:
                raise DataError(f"datasets.{dataset}.{key}: missing dataset: {uri} does not exist (and "
                                f"{spec.shards_uri(dataset)} holds no finished ingest)")


def _fingerprint(ctx, name: str, stage: IngestStage) -> str:
    spec = ctx.spec
    return fingerprint("ingest", asdict(stage),
                       {d: [asdict(spec.datasets[d]), spec.shards_uri(d)] for d in stage.datasets})


def _run(ctx, name: str, stage: IngestStage, fp: str):
    spec, done, built = ctx.spec, {}, []
    for dataset in stage.datasets:
        shards = spec.shards_uri(dataset)
        manifest, changed = ingest_dataset(spec.datasets[dataset], shards, spec.raw_uri(dataset), stage.parallel)
        if changed:
            built.append(dataset)
        ctx.forget_digest(dataset)
        done[dataset] = {"shards": shards, "digest": manifest.digest, "images": manifest.images,
                         "quarantined": len(manifest.quarantined)}
    return {"datasets": done}, {"ingested": built}


def ingest_dataset(ds: DatasetSpec, shards: str, raw_uri: str, parallel: bool):
    """(manifest, whether the shards changed) of dataset ``ds`` ingested to ``shards``; the ingest
    stage and a sweep's synthetic data. A ``synth`` dataset is generated under ``raw_uri`` first (once)."""
    from dino_platform.data.ingest import IngestConfig, ingest

    annotations, images = ds.annotations, ds.images
    if ds.synth is not None:
        _synthesize(ds.synth, raw_uri)
        annotations, images = f"{raw_uri}/annotations.json", f"{raw_uri}/images"
    # NOTE: synthetic annotations are small and may have been regenerated: `ingest` compares their
    # content. Real ones can be many GB: complete shards of the same URIs are trusted without
    # reading them (a file changed in place at the same URI needs its shards deleted).
    before = _complete_ingest(shards, annotations, ds.shard_size)
    if before is not None and ds.synth is None:
        log.info("%s already holds complete shards of %s", shards, annotations)
        return before, False
    log.info("ingesting %s -> %s", annotations, shards)
    manifest = ingest(IngestConfig(format=ds.format, annotations_uri=annotations, images_uri=images,
                                   out_uri=shards, shard_size=ds.shard_size, parallel=parallel))
    return manifest, before is None or manifest.digest != before.digest


def _complete_ingest(shards: str, annotations: str, shard_size: int):
    """The manifest of ``shards`` when it is a finished ingest of ``annotations`` at ``shard_size``; else None."""
    try:
        manifest = verify_shards(shards)
    except (DataError, StorageError):
        return None
    if manifest.source.get("annotations") != resolve(annotations).uri or manifest.shard_size != shard_size:
        return None
    return manifest


def _synthesize(s: SynthSpec, raw_uri: str) -> None:
    """Generate the synthetic raw data once (``synth.json`` records what was generated)."""
    from dino_platform.data.synth import SynthConfig, generate

    wanted = {"kind": s.kind, "images": s.images, "seed": s.seed, "size": list(s.size)}
    root = resolve(raw_uri)
    marker = root.child("synth.json")
    if marker.exists() and json.loads(marker.read_bytes()) == wanted and root.child("annotations.json").exists():
        return
    log.info("generating synthetic %s data (%d images) in %s", s.kind, s.images, root.uri)
    generate(SynthConfig(kind=s.kind, images=s.images, seed=s.seed, size=tuple(s.size)), root.uri)
    marker.write_bytes(json.dumps(wanted).encode())


def _outputs_exist(ctx, outputs: Dict[str, Any]) -> bool:
    return holds(lambda: all(verify_shards(o["shards"]).digest == o["digest"]
                             for o in outputs.get("datasets", {}).values()), DataError, StorageError)


KIND = StageKind("ingest", IngestStage, ("shards",), _validate, _fingerprint, _run, _outputs_exist,
                 summary=lambda outputs: None, preflight=_preflight, datasets=lambda stage: stage.datasets)
