"""Optimiser parameter groups following the official DINO recipe."""
from __future__ import annotations

from typing import Dict, List, Sequence

from torch import nn


def param_groups(model: nn.Module, lr: float = 1e-4, lr_backbone: float = 1e-5, lr_linear_proj_mult: float = 0.1,
                 weight_decay: float = 1e-4, backbone_names: Sequence[str] = ("backbone.0",),
                 linear_proj_names: Sequence[str] = ("reference_points", "sampling_offsets")) -> List[Dict]:
    """AdamW groups: the rest at ``lr``, backbone at ``lr_backbone``, sampling offsets at ``lr * mult``.

    Frozen parameters are left out; shared parameters (the decoder heads) appear once.
    """
    groups = {"default": [], "backbone": [], "linear_proj": []}
    for name, p in model.named_parameters():  # named_parameters() yields shared tensors once
        if not p.requires_grad:
            continue
        if any(n in name for n in backbone_names):
            groups["backbone"].append(p)
        elif any(n in name for n in linear_proj_names):
            groups["linear_proj"].append(p)
        else:
            groups["default"].append(p)
    rates = {"default": lr, "backbone": lr_backbone, "linear_proj": lr * lr_linear_proj_mult}
    return [{"params": ps, "lr": rates[g], "weight_decay": weight_decay, "name": g} for g, ps in groups.items() if ps]
