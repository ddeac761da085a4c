"""The one saved-model format and its loader. An artifact is a directory with no pickled code::

    model.pt            {name: fp32 tensor} in the official DINO key layout (torch.load(weights_only=True))
    model_config.json   {"format": "dino-platform-model", "format_version": 2, "preset", "num_classes",
                        "overrides", "transform" (data.transform mapping), "categories" {id: name}, "source"}

A training checkpoint directory is one (with its training state beside); a registered version holds
exactly these files. ``load_artifact("models:/dino-coco@champion").detector()`` (or ``.build()``).
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from dino_platform.errors import ConfigError, StorageError
from dino_platform.model.config import ModelConfig, build_model
from dino_platform.model.detector import TorchDetector
from dino_platform.storage import Location, resolve

MODEL_FILE = "model.pt"
CONFIG_FILE = "model_config.json"
FORMAT = "dino-platform-model"
FILES = (CONFIG_FILE, MODEL_FILE)  # copy in this order: a present model.pt means a complete copy


@dataclass(frozen=True)
class Artifact:
    """A model ready to build: its config, weights (read when built), evaluation transform and class names."""

    model: ModelConfig
    weights: Location  # model.pt, or an official .pth
    transform: Dict[str, Any]  # data.transform mapping (its evaluation resize is what the model expects)
    categories: Dict[int, str]  # class id -> name
    source: str  # the URI it was loaded from

    def build(self) -> Tuple[torch.nn.Module, torch.nn.Module]:
        """(model in eval mode on CPU with these weights, loaded strictly; its postprocessor)."""
        import dino_core

        model, _, postprocessor = build_model(self.model)
        dino_core.load_official_state_dict(model, read_model_state(self.weights), strict=True)
        return model.eval(), postprocessor

    def detector(self) -> TorchDetector:
        model, postprocessor = self.build()
        return TorchDetector(categories=dict(self.categories), transform=dict(self.transform), source=self.source,
                             model=model, postprocessor=postprocessor)

    def write(self, directory: Path) -> None:
        """This artifact's files in ``directory``: its weights as read (``model.pt`` and official files hold
        the official layout already) and its config. Callers have built it before (registering follows an
        evaluation), so the weights are not loaded into a model again here."""
        write_artifact(directory, read_model_state(self.weights), self.model, self.transform, self.categories,
                       self.source)


def write_artifact(directory: Path, state: Mapping[str, torch.Tensor], model: ModelConfig,
                   transform: Mapping[str, Any], categories: Mapping[int, str], source: str = "") -> None:
    """Write ``model.pt`` (``state``, official key layout) and ``model_config.json`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state), directory / MODEL_FILE)
    config = {"format": FORMAT, "format_version": 2, "preset": model.preset,
              "num_classes": int(model.num_classes), "overrides": dict(model.overrides or {}),
              "transform": dict(transform or {}), "categories": {str(k): v for k, v in sorted(categories.items())},
              "source": source}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))


def load_artifact(uri: str, tracking_uri: Optional[str] = None, preset: Optional[str] = None,
                  num_classes: Optional[int] = None, overrides: Optional[Mapping[str, Any]] = None) -> Artifact:
    """The model ``uri`` names: ``models:/name@alias`` or ``models:/name/3`` (downloaded from the registry
    at ``tracking_uri``, default ``$MLFLOW_TRACKING_URI``), an artifact or checkpoint directory, its
    ``model.pt``, or an official DINO ``.pth`` (which records no model: give ``preset`` and ``num_classes``).

    ``preset``/``num_classes``/``overrides`` given replace what the artifact records.
    """
    if uri.startswith("models:/"):
        from dino_platform.registry.models import download_model

        registry = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not registry:
            raise ConfigError(f"{uri}: which registry? set MLFLOW_TRACKING_URI or pass --tracking-uri")
        weights = resolve(str(download_model(uri, registry, required=FILES) / MODEL_FILE))
    else:
        weights = weights_location(uri)
    config_file = resolve(weights.uri.rsplit("/", 1)[0]).child(CONFIG_FILE)
    recorded = json.loads(config_file.read_bytes()) if config_file.exists() else {}
    preset, num_classes = preset or recorded.get("preset"), num_classes or recorded.get("num_classes")
    if not preset or not num_classes:
        raise ConfigError(f"{uri}: no {CONFIG_FILE} beside the weights (an official checkpoint?); name its model: "
                          "--preset and --num-classes (e.g. dino_r50_4scale, 91), or a pipeline stage's "
                          "model: {preset, num_classes}")
    overrides = recorded.get("overrides") if overrides is None else overrides
    model = ModelConfig(preset=preset, num_classes=int(num_classes), overrides=dict(overrides or {}))
    categories = {int(k): v for k, v in (recorded.get("categories") or {}).items()}
    if not categories:  # a class head of the COCO or Objects365 size: their names
        from dino_platform.data.categories import coco_categories, objects365_categories

        categories = {91: coco_categories, 366: objects365_categories}.get(model.num_classes, dict)()
    return Artifact(model=model, weights=weights, transform=dict(recorded.get("transform") or {}),
                    categories=categories, source=uri)


# ---------------------------------------------------------------------------------------------
# reading model weights from anywhere (local path, s3://, an artifact directory)


def weights_location(uri: str) -> Location:
    """The storage Location of the weights file ``uri`` names: itself, or ``model.pt`` inside it.

    Resolve on the driver and hand the Location to workers: it carries its filesystem (and S3
    settings), so workers need not share the driver's AWS environment.
    """
    location = resolve(uri)
    if location.is_file():
        return location
    candidate = location.child(MODEL_FILE)
    if not candidate.is_file():
        raise StorageError(f"{uri}: neither a weights file nor a checkpoint directory with {MODEL_FILE}")
    return candidate


def read_model_state(source) -> Dict[str, torch.Tensor]:
    """Weights from a URI or Location (``model.pt``, an artifact directory, an official ``.pth``), loaded safely.

    Official files wrap the weights as ``{"model": state_dict, ...}``; that wrapper is removed.
    """
    location = weights_location(source) if isinstance(source, str) else source
    data = location.read_bytes()
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-tensor payloads
        raise StorageError(f"{location.uri}: cannot be read as model weights "
                           f"({exc.__class__.__name__}: {exc})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise StorageError(f"{location.uri}: expected a state_dict (name -> tensor)")
    return obj
