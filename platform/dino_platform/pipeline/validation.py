"""Checks of a pipeline spec that need no storage and no cluster, shared by the stage kinds.

``Scope`` holds the datasets ingested and the stages declared so far, so a typo'd dataset or stage
name, or a stage reading an output no earlier stage produces, fails before anything starts.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Set, Tuple

from dino_platform.errors import ConfigError
from dino_platform.pipeline.spec import NAME_PATTERN, DatasetSpec, PipelineSpec, SourceRef
from dino_platform.yaml_docs import did_you_mean

_MODEL_URI = re.compile(r"^models:/[^/@]+(@[A-Za-z0-9_-]+|/\d+)$")


def validate_spec(spec: PipelineSpec) -> None:
    """The spec-wide fields and the datasets (the stages are checked by their kinds)."""
    if not NAME_PATTERN.match(spec.name):
        raise ConfigError(f"name: {spec.name!r} must be letters, digits, '_' and '-'")
    if spec.ray.num_cpus is not None and spec.ray.num_cpus < 1:
        raise ConfigError(f"ray.num_cpus: {spec.ray.num_cpus} must be >= 1")
    if not spec.output_is_local and not (spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise ConfigError(f"tracking.uri: required when output_root ({spec.output_root}) is not local: every "
                          "node must reach the tracking store (an MLflow server, e.g. http://mlflow:5000, "
                          "or $MLFLOW_TRACKING_URI)")
    for name, ds in spec.datasets.items():
        _validate_dataset(name, ds)


@dataclass
class Scope:
    """What a stage may refer to: the datasets ingested and the stages declared before it."""

    spec: PipelineSpec
    kind_outputs: Dict[str, Tuple[str, ...]]  # stage kind -> what it produces
    ingested: Set[str] = field(default_factory=set)
    earlier: Dict[str, str] = field(default_factory=dict)  # stage name -> kind, in order

    def dataset(self, where: str, name: str, ingested: bool = True) -> None:
        """``name`` is a dataset; with ``ingested``, one an earlier stage ingests (or already sharded)."""
        spec = self.spec
        if not name:
            raise ConfigError(f"{where}: name a dataset (one of {', '.join(spec.datasets)})")
        if name not in spec.datasets:
            raise ConfigError(f"{where}: no dataset named {name!r}{did_you_mean(name, spec.datasets)}; "
                              f"datasets: {', '.join(spec.datasets)}")
        if ingested and spec.datasets[name].has_raw_source and name not in self.ingested:
            raise ConfigError(f"{where}: dataset {name} is raw data that no earlier ingest stage lists; add it to "
                              f"an ingest stage before this one, or point datasets.{name}.shards at an existing "
                              "ingest (and drop its annotations/images/synth)")

    def source(self, where: str, ref: SourceRef, outputs: Tuple[str, ...]) -> None:
        """Exactly one of stage / uri / model; the stage an earlier one producing one of ``outputs``."""
        given = [k for k in ("stage", "uri", "model") if getattr(ref, k)]
        if len(given) != 1:
            raise ConfigError(f"{where}: give exactly one of stage (an earlier stage's output), uri or model "
                              f"(models:/name@alias), got {', '.join(given) or 'none'}")
        if ref.model is not None and not _MODEL_URI.match(ref.model):
            raise ConfigError(f"{where}.model: {ref.model!r} is not a registry URI like models:/dino-coco@champion "
                              "or models:/dino-coco/3")
        if ref.stage is not None:
            kind = self.earlier.get(ref.stage)
            if kind is None or not set(self.kind_outputs[kind]) & set(outputs):
                self.missing_stage(f"{where}.stage", ref.stage, None, outputs)

    def missing_stage(self, where: str, name: str, kind: Optional[str], outputs: Tuple[str, ...]) -> None:
        wanted = " or ".join(outputs)
        produces = self.kind_outputs
        producers = [n for n, k in self.earlier.items()
                     if (kind is None or k == kind) and set(outputs) & set(produces[k])]
        if name in self.earlier:
            raise ConfigError(f"{where}: reads {wanted} from {name!r}, but {name} is a {self.earlier[name]} stage, "
                              f"which produces {', '.join(produces[self.earlier[name]])}; earlier stages producing "
                              f"{wanted}: {', '.join(producers) or 'none'}")
        raise ConfigError(f"{where}: reads {wanted} from {name!r}, but no earlier stage is named so"
                          f"{did_you_mean(name, self.earlier)}; earlier stages producing {wanted}: "
                          f"{', '.join(producers) or 'none'} (stages run in the order written)")


def _validate_dataset(name: str, ds: DatasetSpec) -> None:
    where = f"datasets.{name}"
    if (ds.annotations is None) != (ds.images is None):
        missing = "images" if ds.images is None else "annotations"
        raise ConfigError(f"{where}.{missing}: required together with "
                          f"{'annotations' if missing == 'images' else 'images'}")
    if ds.synth is not None and ds.annotations is not None:
        raise ConfigError(f"{where}: give either synth or annotations + images, not both")
    if not ds.has_raw_source and not ds.shards:
        raise ConfigError(f"{where}: no data; give annotations + images (raw COCO-style data to ingest), "
                          "synth (generated), or shards (the URI of an existing `dino ingest` output)")
    if ds.synth is not None:
        if ds.synth.kind != ds.format:
            raise ConfigError(f"{where}.synth.kind: {ds.synth.kind!r} differs from {where}.format {ds.format!r}")
        if ds.synth.images < 1 or len(ds.synth.size) != 2 or min(ds.synth.size) < 64:
            raise ConfigError(f"{where}.synth: images >= 1 and size [width, height] of at least 64 each")
    if ds.shard_size < 1:
        raise ConfigError(f"{where}.shard_size: {ds.shard_size} must be >= 1")


def validate_model(where: str, model) -> None:
    """``model.preset`` is a dino_core preset, its ``overrides`` fit it, ``num_classes`` >= 1."""
    import dino_core

    if model.preset not in dino_core.PRESETS:
        raise ConfigError(f"{where}.preset: {model.preset!r} is not a dino_core preset"
                          f"{did_you_mean(model.preset, dino_core.PRESETS)}; one of {', '.join(dino_core.PRESETS)}")
    try:
        dino_core.get_config(model.preset, **model.overrides)
    except ValueError as exc:
        raise ConfigError(f"{where}.overrides: {exc}") from None
    if model.num_classes < 1:
        raise ConfigError(f"{where}.num_classes: {model.num_classes} must be >= 1 (max category id + 1)")
