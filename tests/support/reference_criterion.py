"""The per-set criterion, one output set and one image at a time: the oracle for the stacked one.

This is the official computation written plainly (a matching per output set, index tensors per
image, a loss call per set); ``dino_core.criterion.SetCriterion`` must give the same losses.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from dino_core.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from dino_core.criterion import sigmoid_focal_loss, top1_accuracy


def match(matcher, outputs, targets):
    sizes = [len(t["boxes"]) for t in targets]
    if sum(sizes) == 0:
        return [(torch.zeros(0, dtype=torch.int64),) * 2 for _ in targets]
    cost = matcher.cost_matrix(outputs, targets).cpu()
    return [tuple(torch.as_tensor(x, dtype=torch.int64) for x in linear_sum_assignment(c[i]))
            for i, c in enumerate(cost.split(sizes, -1))]


def set_losses(outputs, targets, indices, num_boxes, num_classes, alpha, log):
    logits = outputs["pred_logits"].float()
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).long()
    target_classes = torch.full(logits.shape[:2], num_classes, dtype=torch.int64)
    target_classes[batch_idx, src_idx] = labels
    onehot = torch.zeros(*logits.shape[:2], logits.shape[2] + 1).scatter_(2, target_classes.unsqueeze(-1), 1)[..., :-1]
    out = {"loss_ce": sigmoid_focal_loss(logits, onehot, num_boxes, alpha, 2) * logits.shape[1]}
    if log:
        out["class_error"] = 100 - top1_accuracy(logits[batch_idx, src_idx].detach(), labels)
    src_boxes = outputs["pred_boxes"].float()[batch_idx, src_idx]
    target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).float()
    l1 = F.l1_loss(src_boxes, target_boxes, reduction="none")
    giou = 1 - torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes)))
    out.update(loss_bbox=l1.sum() / num_boxes, loss_giou=giou.sum() / num_boxes,
               loss_xy=l1[:, :2].sum() / num_boxes, loss_hw=l1[:, 2:].sum() / num_boxes)
    lengths = torch.as_tensor([len(t["labels"]) for t in targets])
    card = (outputs["pred_logits"].argmax(-1) != outputs["pred_logits"].shape[-1] - 1).sum(1)
    out["cardinality_error"] = F.l1_loss(card.float(), lengths.float())
    return out


def reference_losses(criterion, outputs: Dict, targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The losses of ``criterion`` (a SetCriterion) computed set by set, on CPU, without a process group."""
    num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
    k, alpha, matcher = criterion.num_classes, criterion.focal_alpha, criterion.matcher
    losses = {}
    dn_meta = outputs.get("dn_meta")
    dn_out = dn_meta.get("output_known_lbs_bboxes") if dn_meta else None
    zero_dn = {n: torch.zeros([]) for n in ("loss_ce", "loss_bbox", "loss_giou", "loss_xy", "loss_hw", "cardinality_error")}
    if dn_out is not None:
        groups = dn_meta["num_dn_group"]
        size = dn_meta["pad_size"] // groups
        dn_idx = []
        for t in targets:
            tgt = torch.arange(len(t["labels"])).repeat(groups)
            src = torch.arange(groups).repeat_interleave(len(t["labels"])) * size + tgt
            dn_idx.append((src, tgt))
    sets = [(a, f"_{i}", dn_out["aux_outputs"][i] if dn_out else None) for i, a in enumerate(outputs["aux_outputs"])]
    sets.append(({k_: v for k_, v in outputs.items() if k_ != "aux_outputs"}, "", dn_out))
    for out, suffix, dn_set in sets:
        losses.update({f"{n}{suffix}": v for n, v in
                       set_losses(out, targets, match(matcher, out, targets), num_boxes, k, alpha, suffix == "").items()})
        dn_losses = zero_dn if dn_set is None else set_losses(dn_set, targets, dn_idx, num_boxes * groups, k, alpha, False)
        dn_suffix = "_dn" if suffix == "" else f"_dn{suffix}"
        losses.update({f"{n}{dn_suffix}": v for n, v in dn_losses.items()})
    interm = outputs["interm_outputs"]
    losses.update({f"{n}_interm": v for n, v in
                   set_losses(interm, targets, match(matcher, interm, targets), num_boxes, k, alpha, False).items()})
    return losses
