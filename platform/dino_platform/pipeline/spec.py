"""The parts of a pipeline spec every stage kind shares: datasets, weight references, model and
resources sections, and ``PipelineSpec`` with the locations derived from it.

Each stage kind's own section is its dataclass in ``pipeline/stages/<kind>.py``; ``loader.load_spec``
reads the YAML into these types and validates it. See ``docs/pipelines.md`` for the file format.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional

NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def class_maps() -> Dict[str, Callable[[], Dict[int, int]]]:
    """Shipped class maps by name: {checkpoint class id: model class id}."""
    from dino_platform.data.categories import o365_to_coco_ids

    return {"o365_to_coco": o365_to_coco_ids}


@dataclass
class SynthSpec:
    """Raw data made by ``dino synth`` (demos and tests) instead of annotation/image URIs."""

    kind: Literal["o365", "coco"] = "coco"
    images: int = 32
    seed: int = 0
    size: List[int] = field(default_factory=lambda: [320, 240])  # nominal (width, height)


@dataclass
class DatasetSpec:
    """One dataset: where its raw form is (to ingest) and where its shards are (or go)."""

    format: Literal["coco", "o365"] = "coco"
    annotations: Optional[str] = None  # COCO-style JSON URI
    images: Optional[str] = None  # image folder URI
    synth: Optional[SynthSpec] = None  # or: generate the raw data
    shards: Optional[str] = None  # default <output_root>/shards/<name>; alone = already ingested
    shard_size: int = 512

    @property
    def has_raw_source(self) -> bool:
        return self.synth is not None or self.annotations is not None


@dataclass
class SourceRef:
    """Where weights come from: an earlier stage's output, a URI, or a registered model."""

    stage: Optional[str] = None  # e.g. finetune (reads its checkpoint)
    uri: Optional[str] = None  # checkpoint dir, model.pt, or an official DINO .pth (local or s3://)
    model: Optional[str] = None  # models:/dino-coco@champion or models:/dino-coco/3


@dataclass
class RaySpec:
    # None: the cluster of the Ray job this runs in (RAY_ADDRESS), else a fresh local instance
    address: Optional[str] = None
    num_cpus: Optional[int] = None  # CPUs of a fresh local instance (None: all of this machine)


@dataclass
class TrackingSpec:
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<output_root>/mlflow.db (local output roots only)
    uri: Optional[str] = None
    experiment: Optional[str] = None  # default: the pipeline name


@dataclass
class PipelineSpec:
    name: str
    output_root: str
    datasets: Dict[str, DatasetSpec]
    stages: Dict[str, Any]  # name -> its kind's spec dataclass, in run order
    ray: RaySpec = field(default_factory=RaySpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    description: str = ""
    source: str = ""  # the file it came from
    preset: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)  # resolved mapping (presets applied)

    def shards_uri(self, dataset: str) -> str:
        ds = self.datasets[dataset]
        return ds.shards or _join(self.output_root, f"shards/{dataset}")

    def raw_uri(self, dataset: str) -> str:
        """Where synthetic raw data is generated (synth datasets only)."""
        return _join(self.output_root, f"raw/{dataset}")

    @property
    def state_uri(self) -> str:
        return _join(self.output_root, "pipeline_state.json")

    @property
    def train_storage(self) -> str:
        return _join(self.output_root, "train")

    @property
    def output_is_local(self) -> bool:
        return "://" not in self.output_root or self.output_root.startswith("file://")

    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        from dino_platform.storage import resolve

        return f"sqlite:///{resolve(self.output_root).path}/mlflow.db"

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name


def _join(root: str, relative: str) -> str:
    return f"{root.rstrip('/')}/{relative}"
