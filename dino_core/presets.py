"""Model configurations as plain data. ``build_model(name, **overrides)`` starts from one of these."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class DinoConfig:
    """Every knob of the model, the criterion and the post-processing (defaults: official R50 4-scale)."""

    backbone: str = "resnet50"                 # timm model name
    backbone_kind: str = "resnet"              # "resnet" | "swin"
    return_interm_indices: Tuple[int, ...] = (1, 2, 3)  # backbone stages, 0 = first
    frozen_bn: bool = True                     # ResNet: FrozenBatchNorm2d everywhere
    train_stem_and_layer1: bool = False        # ResNet: official freezes the stem and layer1
    backbone_drop_path: float = 0.2            # Swin
    use_checkpoint: bool = False               # gradient checkpointing of the Swin blocks (official for Swin-L)
    transformer_checkpoint: bool = False       # gradient checkpointing of encoder/decoder layers
    num_feature_levels: int = 4
    hidden_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 2048
    enc_layers: int = 6
    dec_layers: int = 6
    enc_n_points: int = 4
    dec_n_points: int = 4
    dropout: float = 0.0
    num_queries: int = 900
    pe_temperature: float = 20.0
    # contrastive denoising
    dn_number: int = 100
    dn_label_noise_ratio: float = 0.5
    dn_box_noise_scale: float = 1.0            # official scripts pass 1.0 (config file says 0.4)
    # matcher / criterion
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    interm_loss_coef: float = 1.0
    focal_alpha: float = 0.25
    # post-processing
    num_select: int = 300

    def validate(self) -> "DinoConfig":
        """Raise ``ValueError`` naming the field when a value cannot work."""
        def bad(name: str, why: str):
            raise ValueError(f"model config field '{name}' = {getattr(self, name)!r}: {why}")

        if self.backbone_kind not in ("resnet", "swin"):
            bad("backbone_kind", "expected 'resnet' or 'swin'")
        if not self.return_interm_indices or any(i not in (0, 1, 2, 3) for i in self.return_interm_indices):
            bad("return_interm_indices", "expected a non-empty subset of (0, 1, 2, 3)")
        if self.num_feature_levels < len(self.return_interm_indices):
            bad("num_feature_levels", f"must be >= len(return_interm_indices) = {len(self.return_interm_indices)}")
        if self.hidden_dim % 32:
            bad("hidden_dim", "must be a multiple of 32 (GroupNorm(32) in the input projections)")
        if self.hidden_dim % self.nheads:
            bad("hidden_dim", f"must be divisible by nheads = {self.nheads}")
        for name in ("enc_layers", "dec_layers", "num_queries", "nheads", "enc_n_points", "dec_n_points",
                     "dim_feedforward", "num_select"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.dn_number < 0:
            bad("dn_number", "must be >= 0 (0 disables denoising)")
        if not 0 <= self.dn_label_noise_ratio <= 1:
            bad("dn_label_noise_ratio", "must be in [0, 1]")
        if not 0 <= self.dropout < 1:
            bad("dropout", "must be in [0, 1)")
        return self

    def replace(self, **overrides) -> "DinoConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}; known fields: {sorted(known)}")
        if "return_interm_indices" in overrides:
            overrides["return_interm_indices"] = tuple(overrides["return_interm_indices"])
        return dataclasses.replace(self, **overrides).validate()


_SWIN_L = dict(backbone="swin_large_patch4_window12_384", backbone_kind="swin", use_checkpoint=True)

PRESETS: Dict[str, DinoConfig] = {
    # official DINO-4scale (R50): 49.0 AP at 12 epochs
    "dino_r50_4scale": DinoConfig(),
    "dino_r50_5scale": DinoConfig(return_interm_indices=(0, 1, 2, 3), num_feature_levels=5),
    "dino_swinl_4scale": DinoConfig(**_SWIN_L),
    "dino_swinl_5scale": DinoConfig(**_SWIN_L, return_interm_indices=(0, 1, 2, 3), num_feature_levels=5),
    # small and fast for CPU tests and demos (not a published configuration)
    "dino_tiny": DinoConfig(backbone="resnet18", frozen_bn=False, train_stem_and_layer1=True,
                            hidden_dim=64, nheads=4, dim_feedforward=256, enc_layers=2, dec_layers=3,
                            num_feature_levels=3, enc_n_points=4, dec_n_points=4, num_queries=100,
                            dn_number=50, num_select=100),
}


def get_config(name: str, **overrides) -> DinoConfig:
    """The preset ``name`` with ``overrides`` applied and validated."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
