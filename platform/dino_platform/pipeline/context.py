"""What stages share in one run, and how a stage's reference to weights is resolved, fingerprinted
and checked (the stage kinds' protocol is in ``kind.py``)."""
from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Tuple

from dino_platform.data.manifest import read_manifest
from dino_platform.errors import StorageError
from dino_platform.model.artifact import FILES, MODEL_FILE, weights_location
from dino_platform.pipeline.spec import PipelineSpec, SourceRef
from dino_platform.pipeline.state import PipelineState
from dino_platform.registry.models import download_model, resolve_version
from dino_platform.storage import resolve


@dataclass
class StageContext:
    """What stages share within one run of the pipeline."""

    spec: PipelineSpec
    state: PipelineState
    tracking_uri: str
    git_commit: str
    outputs: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # stage -> outputs (this run or recorded)
    fingerprints: Dict[str, str] = field(default_factory=dict)
    _digests: Dict[str, str] = field(default_factory=dict)
    _content: Dict[str, str] = field(default_factory=dict)

    def dataset_digest(self, name: str) -> str:
        """The manifest digest of dataset ``name``'s shards (content of every shard, in order)."""
        if name not in self._digests:
            self._digests[name] = read_manifest(self.spec.shards_uri(name)).digest
        return self._digests[name]

    def forget_digest(self, name: str) -> None:
        self._digests.pop(name, None)

    def content_sha256(self, uri: str) -> str:
        """sha256 of the weights file ``uri`` names (a checkpoint directory means its model.pt)."""
        if uri not in self._content:
            location = weights_location(uri)
            hasher = hashlib.sha256()
            with location.fs.open_input_stream(location.path) as stream:
                while chunk := stream.read(16 << 20):
                    hasher.update(chunk)
            self._content[uri] = hasher.hexdigest()
        return self._content[uri]


def weights_identity(ctx: StageContext, ref: SourceRef) -> Dict[str, Any]:
    """What identifies the weights ``ref`` names: the producing stage's fingerprint, a content hash, a version."""
    if ref.stage:
        return {"stage": ref.stage, "fingerprint": ctx.fingerprints[ref.stage]}
    if ref.uri:
        return {"uri": ref.uri, "sha256": ctx.content_sha256(ref.uri)}
    version = resolve_version(ref.model, ctx.tracking_uri)
    return {"model": ref.model, "version": version.version, "run_id": version.run_id}


def model_reference(ctx: StageContext, ref: SourceRef) -> Tuple[str, Dict[str, Any]]:
    """(URI for load_artifact, what identifies it) of a predict/infer stage's ``model``."""
    if ref.stage and "alias_uri" in ctx.outputs[ref.stage]:  # a register stage: its alias
        uri = ctx.outputs[ref.stage]["alias_uri"]
        version = resolve_version(uri, ctx.tracking_uri)
        return uri, {"model": uri, "version": version.version}
    return ctx.outputs[ref.stage]["checkpoint"] if ref.stage else ref.uri or ref.model, weights_identity(ctx, ref)


def weights_source(ctx: StageContext, ref: SourceRef) -> Tuple[str, Dict[str, Any]]:
    """(URI of the weights, lineage of what produced them) for an init/checkpoint reference."""
    empty = {"runs": {}, "datasets": {}, "configs": {}}
    if ref.stage:
        upstream = ctx.outputs[ref.stage]
        return upstream["checkpoint"], upstream.get("lineage", empty)
    if ref.uri:
        return ref.uri, {**empty, "weights": {ref.uri: ctx.content_sha256(ref.uri)}}
    return _registry_weights(ctx, ref.model), {**empty, "registry": ref.model}


def _registry_weights(ctx: StageContext, model_uri: str) -> str:
    """Copy a registered version's artifact under the output root (reachable by every node); its URI."""
    version = resolve_version(model_uri, ctx.tracking_uri)
    target = resolve(ctx.spec.output_root).child(f"registry_cache/{version.name}-v{version.version}")
    if not target.child(MODEL_FILE).exists():
        with tempfile.TemporaryDirectory(prefix="dino-model-") as tmp:
            local = download_model(f"models:/{version.name}/{version.version}", ctx.tracking_uri, tmp, required=FILES)
            for file in FILES:
                target.child(file).write_bytes(Path(local, file).read_bytes())
    return target.uri


def check_source_exists(spec: PipelineSpec, where: str, ref: SourceRef) -> None:
    """Preflight: the checkpoint URI or registry model ``ref`` names exists (an earlier stage's is made here)."""
    if ref.uri:
        try:
            weights_location(ref.uri)
        except StorageError as exc:
            raise StorageError(f"{where}.uri: {exc}") from None
    if ref.model:
        resolve_version(ref.model, spec.tracking_uri(), field=f"{where}.model")
