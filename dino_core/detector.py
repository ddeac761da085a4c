"""The DINO detector: backbone -> input projections -> deformable transformer -> shared heads."""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional

import torch
from torch import nn

from .backbone import Backbone
from .box_ops import inverse_sigmoid
from .denoising import prepare_denoising_queries
from .layers import MLP
from .transformer import DeformableTransformer


class DINO(nn.Module):
    """DETR with Improved deNoising anchOr boxes (arXiv 2203.03605).

    Args:
        backbone: :class:`~dino_core.backbone.Backbone` (multi-scale maps + position embeddings).
        transformer: :class:`~dino_core.transformer.DeformableTransformer`.
        num_classes: size of the class head; labels are raw dataset ids (COCO: 91).
        num_feature_levels: levels fed to the transformer; extra ones are stride-2 convs on the last map.
        dn_number / dn_label_noise_ratio / dn_box_noise_scale: contrastive denoising (0 disables).
        dn_labelbook_size: rows - 1 of the label embedding used by the denoising queries.
    """

    def __init__(self, backbone: Backbone, transformer: DeformableTransformer, num_classes: int,
                 num_feature_levels: int = 4, dn_number: int = 100, dn_label_noise_ratio: float = 0.5,
                 dn_box_noise_scale: float = 1.0, dn_labelbook_size: Optional[int] = None):
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_classes = num_classes
        self.num_queries = transformer.num_queries
        self.hidden_dim = hidden_dim
        self.num_feature_levels = num_feature_levels
        self.dn_number = dn_number
        self.dn_label_noise_ratio = dn_label_noise_ratio
        self.dn_box_noise_scale = dn_box_noise_scale
        self.dn_labelbook_size = num_classes if dn_labelbook_size is None else dn_labelbook_size
        # registration order = the official checkpoint's key order
        self.transformer = transformer
        self.label_enc = nn.Embedding(self.dn_labelbook_size + 1, hidden_dim)

        in_channels = backbone.num_channels
        projections = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
                       for c in in_channels]
        prev = in_channels[-1]
        for _ in range(num_feature_levels - len(in_channels)):
            projections.append(nn.Sequential(nn.Conv2d(prev, hidden_dim, kernel_size=3, stride=2, padding=1),
                                             nn.GroupNorm(32, hidden_dim)))
            prev = hidden_dim
        self.input_proj = nn.ModuleList(projections)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.backbone = backbone

        # one class head and one box head shared by all decoder layers; separate copies for the encoder
        class_embed = nn.Linear(hidden_dim, num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        n_dec = transformer.num_decoder_layers
        self.bbox_embed = nn.ModuleList([bbox_embed] * n_dec)
        self.class_embed = nn.ModuleList([class_embed] * n_dec)
        transformer.decoder.bbox_embed = self.bbox_embed
        transformer.decoder.class_embed = self.class_embed
        transformer.enc_out_bbox_embed = copy.deepcopy(bbox_embed)
        transformer.enc_out_class_embed = copy.deepcopy(class_embed)

    def _multiscale_inputs(self, images: torch.Tensor, mask: torch.Tensor):
        feats, masks, pos = self.backbone(images, mask)
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats)]
        for level in range(len(feats), self.num_feature_levels):
            src = self.input_proj[level](feats[-1] if level == len(feats) else srcs[-1])
            m = torch.nn.functional.interpolate(mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            masks.append(m)
            pos.append(self.backbone.position_embedding(m).to(src.dtype))
        return srcs, masks, pos

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None,
                targets: Optional[List[Dict[str, torch.Tensor]]] = None,
                dn_generator: Optional[torch.Generator] = None,
                query_indices: Optional[torch.Tensor] = None) -> Dict:
        """
        Args:
            images: ``[B, 3, H, W]`` normalised, zero-padded batch.
            mask: ``[B, H, W]`` bool, True on padding (None: no padding).
            targets: training only; per image ``labels [n]`` and ``boxes [n, 4]`` (cx, cy, w, h in
                0..1). In training mode with targets the contrastive denoising queries are added.
            dn_generator: optional RNG for the denoising noise (reproducible runs).
            query_indices: optional ``[B, nq]`` encoder token indices that replace the top-``nq``
                query selection (replaying another implementation's selection, whose order among
                nearly tied proposal scores is not defined); None selects as usual.

        Returns:
            ``pred_logits [B, nq, K]``, ``pred_boxes [B, nq, 4]`` (cx, cy, w, h in 0..1),
            ``aux_outputs`` (one dict per earlier decoder layer), ``interm_outputs`` and
            ``interm_outputs_for_matching_pre`` (encoder top-``nq`` proposals, refined / raw), and
            ``dn_meta`` (None, or ``pad_size``, ``num_dn_group``, ``output_known_lbs_bboxes`` with the
            denoising queries' own ``pred_logits``/``pred_boxes``/``aux_outputs``).
        """
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        srcs, masks, pos = self._multiscale_inputs(images, mask)

        dn = None
        if self.training and targets is not None and self.dn_number > 0:
            dn = prepare_denoising_queries(targets, self.dn_number, self.dn_label_noise_ratio, self.dn_box_noise_scale,
                                           self.num_queries, self.num_classes, self.label_enc, dn_generator)
        hidden, references, enc_hidden, enc_boxes, init_proposals = self.transformer(
            srcs, masks, pos,
            dn.boxes_logit if dn else None, dn.labels_embedded if dn else None, dn.attn_mask if dn else None,
            query_indices=query_indices)
        # keeps label_enc in the graph when a batch has no objects (DDP/ZeRO need every grad)
        hidden[0] = hidden[0] + self.label_enc.weight[0, 0] * 0.0

        boxes = torch.stack([(head(h) + inverse_sigmoid(ref)).sigmoid()
                             for head, h, ref in zip(self.bbox_embed, hidden, references[:-1])])
        logits = torch.stack([head(h) for head, h in zip(self.class_embed, hidden)])

        dn_meta = None
        if dn is not None:
            dn_meta = dict(dn.meta)
            pad = dn_meta["pad_size"]
            if pad > 0:
                dn_meta["output_known_lbs_bboxes"] = self._layer_outputs(logits[:, :, :pad], boxes[:, :, :pad])
                logits, boxes = logits[:, :, pad:], boxes[:, :, pad:]
        out = self._layer_outputs(logits, boxes)
        interm_logits = self.transformer.enc_out_class_embed(enc_hidden)
        out["interm_outputs"] = {"pred_logits": interm_logits, "pred_boxes": enc_boxes}
        out["interm_outputs_for_matching_pre"] = {"pred_logits": interm_logits, "pred_boxes": init_proposals}
        out["dn_meta"] = dn_meta
        return out

    @staticmethod
    def _layer_outputs(logits: torch.Tensor, boxes: torch.Tensor) -> Dict:
        """``[n_layers, B, nq, *]`` stacks -> last layer + ``aux_outputs`` for the others."""
        return {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
                "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]}
