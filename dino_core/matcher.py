"""Hungarian matching of predictions to ground truth (focal-style class cost, L1 and GIoU)."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

HostIndices = Tuple[np.ndarray, np.ndarray]  # (query_idx, target_idx), int64, one image


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising ``cost_class*C_cls + cost_bbox*L1 + cost_giou*(-GIoU)``.

    The class cost is the focal-loss difference between predicting the target class as positive and
    as negative (``alpha = focal_alpha``, ``gamma = 2``), as in Deformable-DETR/DINO.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0; at least one must be positive")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha

    @torch.no_grad()
    def cost_matrix(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
        """``[bs, nq, sum(n_i)]`` float32 cost of assigning each query to each target of the batch."""
        return self.stacked_cost(outputs["pred_logits"], outputs["pred_boxes"],
                                 torch.cat([t["labels"] for t in targets]), torch.cat([t["boxes"] for t in targets]))

    @torch.no_grad()
    def stacked_cost(self, logits: torch.Tensor, boxes: torch.Tensor, target_labels: torch.Tensor,
                     target_boxes: torch.Tensor) -> torch.Tensor:
        """Cost of assigning each query to each target of the batch, for any number of output sets.

        Args:
            logits: ``[..., nq, K]`` class logits (e.g. ``[sets, bs, nq, K]``).
            boxes: ``[..., nq, 4]`` (cx, cy, w, h).
            target_labels: ``[T]`` the batch's labels, images concatenated; target_boxes ``[T, 4]``.

        Returns:
            ``[..., nq, T]`` float32.

        NOTE: computed in float32 whatever the outputs' dtype: in bfloat16, ``-(1 - p).log()`` at
        DINO's prior p = 0.01 cancels like the focal loss does (see ``criterion.sigmoid_focal_loss``).
        """
        lead = logits.shape[:-1]
        prob = logits.flatten(0, -2).float().sigmoid()[:, target_labels.long()]
        out_bbox = boxes.flatten(0, -2).float()
        tgt_bbox = target_boxes.to(out_bbox)
        alpha, gamma = self.focal_alpha, 2.0
        neg = (1 - alpha) * (prob ** gamma) * (-(1 - prob + 1e-8).log())
        pos = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
        cost = self.cost_bbox * cost_bbox + self.cost_class * (pos - neg) + self.cost_giou * cost_giou
        return cost.view(*lead, -1)

    @torch.no_grad()
    def match_sets(self, logits: torch.Tensor, boxes: torch.Tensor, target_labels: torch.Tensor,
                   target_boxes: torch.Tensor, counts: Sequence[int]) -> List[List[HostIndices]]:
        """Match every output set of a step with one device-to-host copy (the one sync of a step).

        Args:
            logits: ``[sets, bs, nq, K]``; boxes ``[sets, bs, nq, 4]`` (cx, cy, w, h).
            target_labels: ``[T]``; target_boxes ``[T, 4]``: the images' targets concatenated.
            counts: targets per image (``sum(counts) == T``), as Python ints.

        Returns:
            ``[set][image] -> (query_idx, target_idx)``: int64 numpy arrays of length
            ``min(nq, counts[image])``, ``target_idx`` local to the image.
        """
        num_sets, bs = logits.shape[:2]
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        if sum(counts) == 0:
            return [[empty] * bs for _ in range(num_sets)]
        cost = self.stacked_cost(logits, boxes, target_labels, target_boxes).cpu().numpy()
        starts = np.concatenate([[0], np.cumsum(counts)])
        matches = []
        for s in range(num_sets):
            per_image = []
            for b in range(bs):
                block = cost[s, b, :, starts[b]:starts[b + 1]]
                rows, cols = linear_sum_assignment(block) if counts[b] else empty
                per_image.append((np.asarray(rows, np.int64), np.asarray(cols, np.int64)))
            matches.append(per_image)
        return matches

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor],
                targets: List[Dict[str, torch.Tensor]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: ``pred_logits [bs, nq, K]`` and ``pred_boxes [bs, nq, 4]`` (cx, cy, w, h).
            targets: per image ``labels [n_i]`` and ``boxes [n_i, 4]``.

        Returns:
            per image ``(query_idx, target_idx)``, int64 CPU tensors of length ``min(nq, n_i)``.
        """
        device = outputs["pred_logits"].device
        labels = torch.cat([t["labels"] for t in targets]).to(device)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device)
        counts = [len(t["labels"]) for t in targets]
        matches = self.match_sets(outputs["pred_logits"][None], outputs["pred_boxes"][None], labels, boxes, counts)
        return [(torch.from_numpy(q), torch.from_numpy(t)) for q, t in matches[0]]
