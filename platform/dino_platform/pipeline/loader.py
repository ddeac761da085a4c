"""Read a pipeline spec: YAML -> preset -> ``--set`` overrides -> typed spec -> every check that
needs no storage and no cluster (the spec's own, then each stage kind's, in the order written).
Errors name the file and the field (``unknown field stages.finetune.config.optim.lrr; ...``).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from dino_platform.errors import ConfigError
from dino_platform.pipeline.spec import NAME_PATTERN, DatasetSpec, PipelineSpec, RaySpec, TrackingSpec
from dino_platform.pipeline.stages import KINDS
from dino_platform.pipeline.validation import Scope, validate_spec
from dino_platform.storage import output_root as storage_output_root
from dino_platform.typed_config import parse_section
from dino_platform.yaml_docs import check_keys, did_you_mean, load_document

_TOP_LEVEL = ("name", "description", "output_root", "ray", "tracking", "datasets", "stages", "presets")


def load_spec(source: Union[str, Path, Dict[str, Any]], preset: Optional[str] = None,
              overrides: Optional[List[str]] = None) -> PipelineSpec:
    """Read a spec, apply ``preset`` and ``key.path=value`` overrides, build and validate it.

    Raises ConfigError naming the file and the field for anything wrong.
    """
    return load_document(source, "pipeline spec", "name, output_root, datasets, stages", preset, overrides,
                         "stages.pretrain.config.optim.max_steps=100", partial(_build_spec, preset=preset))


def _build_spec(raw: Dict[str, Any], origin: str, preset: Optional[str]) -> PipelineSpec:
    check_keys(raw, _TOP_LEVEL)
    for name in ("name", "output_root"):
        if not isinstance(raw.get(name), str) or not raw[name]:
            raise ConfigError(f"{name}: required (a string)")
    datasets_raw = raw.get("datasets") or {}
    stages_raw = raw.get("stages") or {}
    for section, value in (("datasets", datasets_raw), ("stages", stages_raw)):
        if not isinstance(value, dict) or not value:
            raise ConfigError(f"{section}: a non-empty mapping of name -> {section[:-1]} is required")
    datasets = {}
    for name, value in datasets_raw.items():
        _check_name("datasets", name)
        datasets[name] = parse_section(DatasetSpec, value if value is not None else {}, f"datasets.{name}")
    stages = {}
    for name, value in stages_raw.items():
        _check_name("stages", name)
        stages[name] = _build_stage(name, value)
    spec = PipelineSpec(
        # local: absolute from here on (Ray workers have other working dirs); relative in a submitted
        # job: under $DINO_HOME, not in Ray's temporary copy of the working dir
        name=raw["name"], output_root=storage_output_root(raw["output_root"]), datasets=datasets, stages=stages,
        ray=parse_section(RaySpec, raw.get("ray") or {}, "ray"),
        tracking=parse_section(TrackingSpec, raw.get("tracking") or {}, "tracking"),
        description=str(raw.get("description") or ""), source=origin, preset=preset, raw=raw,
    )
    validate_spec(spec)
    scope = Scope(spec, {k.name: k.outputs for k in KINDS.values()})
    for name, stage in spec.stages.items():
        kind = KINDS[stage.kind]
        kind.validate(scope, name, stage)
        if "shards" in kind.outputs:
            scope.ingested.update(kind.datasets(stage))
        scope.earlier[name] = stage.kind
    return spec


def _check_name(section: str, name: Any) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError(f"{section}.{name}: names are letters, digits, '_' and '-', starting with a letter")


def _build_stage(name: str, value: Any) -> Any:
    where = f"stages.{name}"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping with kind: one of {', '.join(KINDS)}")
    kind = value.get("kind", name if name in KINDS else None)
    if kind is None:
        raise ConfigError(f"{where}.kind: required; one of {', '.join(KINDS)}")
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind: {kind!r} is not a stage kind{did_you_mean(kind, KINDS)}; "
                          f"one of {', '.join(KINDS)}")
    moved = getattr(KINDS[kind].spec, "MOVED", {})
    for key in [k for k in value if k in moved]:
        raise ConfigError(f"{where}.{key}: this key moved to {where}.{moved[key]} (see docs/pipelines.md)")
    return parse_section(KINDS[kind].spec, {**value, "kind": kind}, where)
