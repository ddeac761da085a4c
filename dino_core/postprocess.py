"""Turn raw outputs into scored boxes: top-k over queries x classes, no NMS."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from .box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Select the ``num_select`` highest (query, class) sigmoid scores per image."""

    def __init__(self, num_select: int = 300):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], target_sizes) -> List[Dict[str, torch.Tensor]]:
        """
        Args:
            outputs: ``pred_logits [bs, nq, K]``, ``pred_boxes [bs, nq, 4]`` (cx, cy, w, h in 0..1).
            target_sizes: ``[bs, 2]`` ``(h, w)`` to scale boxes to (the original image size for COCO
                evaluation), tensor or nested list.

        Returns:
            per image ``scores [k]``, ``labels [k]`` (class index = dataset category id), ``boxes [k, 4]``
            (x0, y0, x1, y1) in pixels; ``k = min(num_select, nq * K)``.
        """
        scores, labels, boxes = self.batched(outputs, target_sizes)
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]

    @torch.no_grad()
    def batched(self, outputs: Dict[str, torch.Tensor], target_sizes) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward` as three batched tensors ``scores [bs, k]``, ``labels [bs, k]``, ``boxes [bs, k, 4]``
        (no per-image Python loop, so an exported graph keeps a dynamic batch size)."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        target_sizes = torch.as_tensor(target_sizes, device=logits.device)
        if len(logits) != len(target_sizes) or target_sizes.shape[1] != 2:
            raise ValueError(f"target_sizes must be [{len(logits)}, 2] (h, w), got {tuple(target_sizes.shape)}")
        num_classes = logits.shape[2]
        k = min(self.num_select, logits.shape[1] * num_classes)
        scores, index = torch.topk(logits.sigmoid().view(logits.shape[0], -1), k, dim=1)
        query = index // num_classes
        labels = index % num_classes
        xyxy = torch.gather(box_cxcywh_to_xyxy(boxes), 1, query.unsqueeze(-1).repeat(1, 1, 4))
        img_h, img_w = target_sizes.to(xyxy.dtype).unbind(1)
        xyxy = xyxy * torch.stack([img_w, img_h, img_w, img_h], dim=1)[:, None, :]
        return scores, labels, xyxy
