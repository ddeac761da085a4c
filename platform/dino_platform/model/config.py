"""Which ``dino_core`` model to build: ``dino train``'s ``model`` section and every saved model's."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional


@dataclass
class ModelConfig:
    """Which ``dino_core`` model to build and where its first weights come from."""

    preset: str = "dino_tiny"
    # dataset category ids are used as labels directly, so this is max category id + 1 (COCO: 91)
    num_classes: int = 91
    # keyword overrides for dino_core.build_model, e.g. {num_queries: 100}
    overrides: Dict[str, Any] = field(default_factory=dict)
    # official DINO .pth or a platform model.pt / checkpoint directory; None = backbone init only
    init_from: Optional[str] = None
    # class transfer when init_from was trained on another label space: {checkpoint_class_id:
    # model_class_id}; unlisted classes start fresh (dino_core.load_official_state_dict's class_map)
    init_class_map: Optional[Dict[int, int]] = None
    # False: tolerate missing/unexpected keys in init_from (e.g. a different head), reported in the log
    init_strict: bool = True


def build_model(model_cfg: ModelConfig):
    """``(model, criterion, postprocessor)`` from the dino_core preset and overrides."""
    import dino_core

    return dino_core.build_model(model_cfg.preset, num_classes=model_cfg.num_classes, **model_cfg.overrides)
