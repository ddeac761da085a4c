"""``build_model``: preset name -> (model, criterion, postprocessor)."""
from __future__ import annotations

from typing import Tuple

from .backbone import Backbone, ResNetBackbone, SwinBackbone
from .criterion import SetCriterion, build_weight_dict
from .detector import DINO
from .matcher import HungarianMatcher
from .postprocess import PostProcess
from .presets import DinoConfig, get_config
from .transformer import DeformableTransformer


def build_model(name: str = "dino_r50_4scale", num_classes: int = 91,
                **overrides) -> Tuple[DINO, SetCriterion, PostProcess]:
    """Build a DINO model, its criterion and its post-processor from a preset.

    Args:
        name: one of :data:`dino_core.presets.PRESETS` (``dino_r50_4scale``, ``dino_r50_5scale``,
            ``dino_swinl_4scale``, ``dino_swinl_5scale``, ``dino_tiny``).
        num_classes: class-head size = max category id + 1 (COCO with raw ids: 91).
        overrides: any :class:`~dino_core.presets.DinoConfig` field, e.g. ``num_queries=300``.

    Weights are randomly initialised; load pretrained ones with
    :func:`dino_core.load_official_state_dict` (no download ever happens).
    """
    return build_from_config(get_config(name, **overrides), num_classes)


def build_from_config(cfg: DinoConfig, num_classes: int) -> Tuple[DINO, SetCriterion, PostProcess]:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if cfg.backbone_kind == "resnet":
        body = ResNetBackbone(cfg.backbone, cfg.return_interm_indices, cfg.frozen_bn, cfg.train_stem_and_layer1)
    else:
        body = SwinBackbone(cfg.backbone, cfg.return_interm_indices, cfg.backbone_drop_path, cfg.use_checkpoint)
    backbone = Backbone(body, cfg.hidden_dim, cfg.pe_temperature)
    transformer = DeformableTransformer(
        d_model=cfg.hidden_dim, nhead=cfg.nheads, num_queries=cfg.num_queries, num_encoder_layers=cfg.enc_layers,
        num_decoder_layers=cfg.dec_layers, dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout,
        num_feature_levels=cfg.num_feature_levels, enc_n_points=cfg.enc_n_points, dec_n_points=cfg.dec_n_points,
        use_checkpoint=cfg.transformer_checkpoint)
    model = DINO(backbone, transformer, num_classes, num_feature_levels=cfg.num_feature_levels,
                 dn_number=cfg.dn_number, dn_label_noise_ratio=cfg.dn_label_noise_ratio,
                 dn_box_noise_scale=cfg.dn_box_noise_scale)
    model.config = cfg
    matcher = HungarianMatcher(cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou, cfg.focal_alpha)
    weight_dict = build_weight_dict(cfg.dec_layers, cfg.cls_loss_coef, cfg.bbox_loss_coef, cfg.giou_loss_coef,
                                    cfg.interm_loss_coef, use_dn=cfg.dn_number > 0)
    criterion = SetCriterion(num_classes, matcher, weight_dict, cfg.focal_alpha, cfg.dec_layers)
    return model, criterion, PostProcess(cfg.num_select)
