"""dino_core: DINO (DETR with Improved DeNoising Anchor Boxes) in plain PyTorch + timm.

    >>> import dino_core
    >>> model, criterion, postprocessor = dino_core.build_model("dino_r50_4scale", num_classes=91)
    >>> dino_core.load_official_state_dict(model, "checkpoint0011_4scale.pth")

Imports torch, timm and scipy only (never Ray).
"""
from .build import build_from_config, build_model
from .compile import compile_transformer_layers
from .checkpoint import (CheckpointError, LoadReport, export_official_state_dict, load_official_state_dict,
                         read_checkpoint)
from .criterion import SetCriterion
from .detector import DINO
from .optim import param_groups
from .ops import available_implementations, selected_implementation
from .postprocess import PostProcess
from .presets import PRESETS, DinoConfig, get_config

__all__ = [
    "build_model", "build_from_config", "compile_transformer_layers", "load_official_state_dict", "export_official_state_dict",
    "read_checkpoint", "CheckpointError", "LoadReport", "DINO", "SetCriterion", "PostProcess", "PRESETS",
    "DinoConfig", "get_config", "param_groups", "available_implementations", "selected_implementation",
]
__version__ = "0.1.0"
