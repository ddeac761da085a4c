"""DINO's set criterion: focal class loss, L1 and GIoU box losses on every output it produces.

Loss names follow the official code: ``loss_ce``/``loss_bbox``/``loss_giou`` for the last decoder
layer, ``_0`` .. ``_{n-2}`` suffixes for the auxiliary layers, ``_interm`` for the encoder
proposals, and ``_dn`` / ``_dn_{i}`` for the denoising queries. Logging-only terms (``class_error``,
``cardinality_error*``, ``loss_xy*``, ``loss_hw*``) are returned too but carry no weight.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .distributed import collective_device
from .matcher import HungarianMatcher

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, num_boxes: float, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """RetinaNet focal loss, averaged over queries and summed over images, divided by ``num_boxes``.

    ``logits``/``targets``: ``[bs, nq, K]``; returns a float32 scalar.

    NOTE: computed in float32 whatever the input dtype. In bfloat16, ``binary_cross_entropy_with_logits``
    cancels to exactly 0 for every p below ~0.015 (DINO's prior is p = 0.01) and ``1 - p_t`` is off by
    ~37%, so a mixed-precision forward must not pass its dtype on to the loss.
    """
    logits, targets = logits.float(), targets.float()
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Percentage of rows of ``logits [n, K]`` whose argmax is ``labels [n]`` (0 when ``n == 0``)."""
    if labels.numel() == 0:
        return torch.zeros([], device=logits.device)
    return (logits.argmax(-1) == labels).float().sum() * (100.0 / labels.numel())


class SetCriterion(nn.Module):
    """Matches outputs to targets and computes the unweighted loss dict; weights in ``weight_dict``."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Dict[str, float],
                 focal_alpha: float = 0.25, num_decoder_layers: int = 6):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.num_decoder_layers = num_decoder_layers

    # -- individual losses -------------------------------------------------------------------
    @staticmethod
    def _src_permutation(indices: Indices) -> Tuple[torch.Tensor, torch.Tensor]:
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def loss_labels(self, outputs, targets, indices: Indices, num_boxes: float, log: bool = True):
        logits = outputs["pred_logits"].float()  # fp32 loss under autocast, see sigmoid_focal_loss
        idx = self._src_permutation(indices)
        idx = (idx[0].to(logits.device), idx[1].to(logits.device))
        matched_labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)])
        matched_labels = matched_labels.to(logits.device).long()
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[idx] = matched_labels
        onehot = torch.zeros([logits.shape[0], logits.shape[1], logits.shape[2] + 1], dtype=logits.dtype,
                             device=logits.device)
        onehot.scatter_(2, target_classes.unsqueeze(-1), 1)
        onehot = onehot[:, :, :-1]
        losses = {"loss_ce": sigmoid_focal_loss(logits, onehot, num_boxes, self.focal_alpha, 2) * logits.shape[1]}
        if log:
            losses["class_error"] = 100 - top1_accuracy(logits[idx].detach(), matched_labels)
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices: Indices, num_boxes: float):
        """Logging only: |#queries whose argmax is not the last class - #targets| (official definition)."""
        logits = outputs["pred_logits"]
        lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), lengths.float())}

    def loss_boxes(self, outputs, targets, indices: Indices, num_boxes: float):
        idx = self._src_permutation(indices)
        pred_boxes = outputs["pred_boxes"].float()  # fp32 losses under autocast
        src_boxes = pred_boxes[idx[0].to(pred_boxes.device), idx[1].to(pred_boxes.device)]
        target_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)], dim=0)
        target_boxes = target_boxes.to(src_boxes)
        l1 = F.l1_loss(src_boxes, target_boxes, reduction="none")
        giou = 1 - torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes)))
        losses = {"loss_bbox": l1.sum() / num_boxes, "loss_giou": giou.sum() / num_boxes}
        with torch.no_grad():
            losses["loss_xy"] = l1[..., :2].sum() / num_boxes
            losses["loss_hw"] = l1[..., 2:].sum() / num_boxes
        return losses

    def _all_losses(self, outputs, targets, indices: Indices, num_boxes: float, log: bool) -> Dict[str, torch.Tensor]:
        losses = self.loss_labels(outputs, targets, indices, num_boxes, log=log)
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        losses.update(self.loss_cardinality(outputs, targets, indices, num_boxes))
        return losses

    # -- denoising ---------------------------------------------------------------------------
    @staticmethod
    def denoising_indices(dn_meta: Dict, targets) -> Tuple[Indices, int]:
        """Positive DN query ``g * group_size + t`` reconstructs target ``t`` in every group ``g``."""
        num_groups = dn_meta["num_dn_group"]
        group_size = dn_meta["pad_size"] // num_groups  # positives then negatives
        indices = []
        for t in targets:
            n = len(t["labels"])
            if n == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            tgt = torch.arange(n, dtype=torch.int64).unsqueeze(0).repeat(num_groups, 1)
            src = (torch.arange(num_groups, dtype=torch.int64) * group_size).unsqueeze(1) + tgt
            indices.append((src.flatten(), tgt.flatten()))
        return indices, num_groups

    def _zero_dn_losses(self, device) -> Dict[str, torch.Tensor]:
        zero = torch.zeros([], device=device)
        return {k: zero for k in ("loss_bbox_dn", "loss_giou_dn", "loss_ce_dn", "loss_xy_dn", "loss_hw_dn",
                                  "cardinality_error_dn")}

    # -- entry point -------------------------------------------------------------------------
    def num_boxes(self, targets, device) -> float:
        """Targets per process, averaged over the distributed group, at least 1."""
        count = float(sum(len(t["labels"]) for t in targets))
        if not (dist.is_available() and dist.is_initialized()):
            return max(count, 1.0)
        n = torch.as_tensor([count], dtype=torch.float32, device=collective_device())
        dist.all_reduce(n)
        return torch.clamp(n / dist.get_world_size(), min=1).item()

    def forward(self, outputs: Dict, targets: List[Dict[str, torch.Tensor]],
                return_indices: bool = False) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: the detector's output dict (``pred_logits``, ``pred_boxes``, ``aux_outputs``,
                ``interm_outputs``, ``dn_meta`` ...), exactly as the official DINO produces it.
            targets: per image ``labels [n_i]`` int64 and ``boxes [n_i, 4]`` (cx, cy, w, h in 0..1).

        Returns:
            dict of unweighted scalar losses (see module docstring for the names).
        """
        device = outputs["pred_logits"].device
        num_boxes = self.num_boxes(targets, device)
        losses: Dict[str, torch.Tensor] = {}

        dn_meta: Optional[Dict] = outputs.get("dn_meta")
        dn_outputs = dn_meta.get("output_known_lbs_bboxes") if dn_meta else None
        if dn_outputs is not None:
            dn_indices, num_groups = self.denoising_indices(dn_meta, targets)
            l_dict = self._all_losses(dn_outputs, targets, dn_indices, num_boxes * num_groups, log=False)
            losses.update({f"{k}_dn": v for k, v in l_dict.items()})
        else:
            losses.update(self._zero_dn_losses(device))

        main = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        losses.update(self._all_losses(outputs, targets, self.matcher(main, targets), num_boxes, log=True))

        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            l_dict = self._all_losses(aux, targets, self.matcher(aux, targets), num_boxes, log=False)
            losses.update({f"{k}_{i}": v for k, v in l_dict.items()})
            if dn_outputs is not None:
                l_dict = self._all_losses(dn_outputs["aux_outputs"][i], targets, dn_indices,
                                          num_boxes * num_groups, log=False)
                losses.update({f"{k}_dn_{i}": v for k, v in l_dict.items()})
            else:
                losses.update({f"{k}_{i}": v for k, v in self._zero_dn_losses(device).items()})

        if "interm_outputs" in outputs:
            interm = outputs["interm_outputs"]
            l_dict = self._all_losses(interm, targets, self.matcher(interm, targets), num_boxes, log=False)
            losses.update({f"{k}_interm": v for k, v in l_dict.items()})
        return losses

    def total_loss(self, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the losses that have a weight."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)


def build_weight_dict(num_decoder_layers: int, cls: float = 1.0, bbox: float = 5.0, giou: float = 2.0,
                      interm: float = 1.0, use_dn: bool = True) -> Dict[str, float]:
    """The official loss weights for every term of :class:`SetCriterion`."""
    base = {"loss_ce": cls, "loss_bbox": bbox, "loss_giou": giou}
    with_dn = dict(base)
    if use_dn:
        with_dn.update({"loss_ce_dn": cls, "loss_bbox_dn": bbox, "loss_giou_dn": giou})
    weights = dict(with_dn)
    for i in range(num_decoder_layers - 1):
        weights.update({f"{k}_{i}": v for k, v in with_dn.items()})
    weights.update({f"{k}_interm": v * interm for k, v in base.items()})
    return weights
