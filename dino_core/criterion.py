"""DINO's set criterion: focal class loss, L1 and GIoU box losses on every output it produces.

Loss names follow the official code: ``loss_ce``/``loss_bbox``/``loss_giou`` for the last decoder
layer, ``_0`` .. ``_{n-2}`` suffixes for the auxiliary layers, ``_interm`` for the encoder
proposals, and ``_dn`` / ``_dn_{i}`` for the denoising queries. Logging-only terms (``class_error``,
``cardinality_error*``, ``loss_xy*``, ``loss_hw*``) are returned too but carry no weight.

The output sets are stacked and their losses computed together: one matching for the decoder layers
and the encoder proposals (one device-to-host copy for all cost matrices), one index transfer to the
device, and one pass over the matched sets and one over the denoising sets. Per set, the values equal
the official per-set computation up to float summation order.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import host_transfer
from .box_ops import aligned_generalized_box_iou, box_cxcywh_to_xyxy
from .distributed import collective_device
from .matcher import HostIndices, HungarianMatcher

# Set-level terms, in the order the stacked computation returns them.
SET_TERMS = ("loss_ce", "loss_bbox", "loss_giou", "loss_xy", "loss_hw", "cardinality_error")


def focal_loss_elements(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                        gamma: float = 2.0) -> torch.Tensor:
    """Element-wise RetinaNet focal loss in float32; ``logits``/``targets`` of any equal shape."""
    logits, targets = logits.float(), targets.float()
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, num_boxes: float, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """RetinaNet focal loss, averaged over queries and summed over images, divided by ``num_boxes``.

    ``logits``/``targets``: ``[bs, nq, K]``; returns a float32 scalar.

    NOTE: computed in float32 whatever the input dtype. In bfloat16, ``binary_cross_entropy_with_logits``
    cancels to exactly 0 for every p below ~0.015 (DINO's prior is p = 0.01) and ``1 - p_t`` is off by
    ~37%, so a mixed-precision forward must not pass its dtype on to the loss.
    """
    return focal_loss_elements(logits, targets, alpha, gamma).mean(1).sum() / num_boxes


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Percentage of rows of ``logits [n, K]`` whose argmax is ``labels [n]`` (0 when ``n == 0``)."""
    if labels.numel() == 0:
        return torch.zeros([], device=logits.device)
    return (logits.argmax(-1) == labels).float().sum() * (100.0 / labels.numel())


def denoising_indices(counts: Sequence[int], num_groups: int, group_size: int) -> List[HostIndices]:
    """Positive DN query ``g * group_size + t`` reconstructs target ``t`` in every group ``g``.

    ``counts``: targets per image. Returns per image ``(query_idx, target_idx)`` int64 numpy arrays.
    """
    indices = []
    for n in counts:
        target = np.tile(np.arange(n, dtype=np.int64), num_groups)
        query = np.repeat(np.arange(num_groups, dtype=np.int64) * group_size, n) + target
        indices.append((query, target))
    return indices


class _Pairs(NamedTuple):
    """Matched (set, image, query, target) index columns of one stack of output sets, on the device: ``[M]`` each."""

    set_idx: torch.Tensor
    batch_idx: torch.Tensor
    query_idx: torch.Tensor
    target_idx: torch.Tensor


def _flatten_matches(matches: List[List[HostIndices]], starts: np.ndarray) -> np.ndarray:
    """``[set][image] -> (query, local target)`` as a ``[4, M]`` array of set, image, query, global target."""
    columns = [np.zeros((4, 0), np.int64)]
    for s, per_image in enumerate(matches):
        for b, (query, target) in enumerate(per_image):
            n = len(query)
            columns.append(np.stack([np.full(n, s), np.full(n, b), query, target + starts[b]]).astype(np.int64))
    return np.concatenate(columns, 1)


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

    def num_boxes(self, targets, device) -> Union[float, torch.Tensor]:
        """Targets per process, averaged over the distributed group, at least 1.

        A Python float without a process group; otherwise a 0-dim tensor, so the mean is never read
        back to the host.
        """
        count = float(sum(len(t["labels"]) for t in targets))
        if not (dist.is_available() and dist.is_initialized()):
            return max(count, 1.0)
        n = torch.full((1,), count, dtype=torch.float32, device=collective_device())
        dist.all_reduce(n)
        return torch.clamp(n[0] / dist.get_world_size(), min=1)

    def set_losses(self, logits: torch.Tensor, boxes: torch.Tensor, pairs: _Pairs, target_labels: torch.Tensor,
                   target_boxes: torch.Tensor, lengths: torch.Tensor,
                   normalizer: Union[float, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The per-set terms of a stack of output sets.

        Args:
            logits: ``[S, bs, Q, K]``; boxes ``[S, bs, Q, 4]`` (cx, cy, w, h).
            pairs: the matched (set, image, query, target) indices, ``M`` of each.
            target_labels: ``[T]``; target_boxes ``[T, 4]`` float32; lengths ``[bs]`` targets per image.
            normalizer: the box count the sums are divided by.

        Returns:
            each of :data:`SET_TERMS` as ``[S]`` float32.
        """
        num_sets, _, num_queries, num_classes = logits.shape
        logits = logits.float()  # fp32 losses under autocast, see sigmoid_focal_loss
        onehot = torch.zeros_like(logits)
        onehot[pairs.set_idx, pairs.batch_idx, pairs.query_idx, target_labels[pairs.target_idx]] = 1.0
        focal = focal_loss_elements(logits, onehot, self.focal_alpha, 2.0)
        loss_ce = focal.mean(2).sum((1, 2)) / normalizer * num_queries

        src = boxes.float()[pairs.set_idx, pairs.batch_idx, pairs.query_idx]
        tgt = target_boxes[pairs.target_idx]
        l1 = (src - tgt).abs()
        giou = 1 - aligned_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        per_pair = torch.cat([l1.sum(-1, keepdim=True), giou[:, None], l1.detach().view(-1, 2, 2).sum(-1)], 1)
        sums = torch.zeros(num_sets, 4, dtype=per_pair.dtype, device=per_pair.device)
        sums = sums.index_add(0, pairs.set_idx, per_pair) / normalizer

        with torch.no_grad():  # logging only: |#queries not predicting the last class - #targets|
            card_pred = (logits.argmax(-1) != num_classes - 1).sum(-1).float()
            cardinality = (card_pred - lengths).abs().mean(-1)
        return dict(zip(SET_TERMS, (loss_ce, sums[:, 0], sums[:, 1], sums[:, 2], sums[:, 3], cardinality)))

    def forward(self, outputs: Dict, targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: the detector's output dict (``pred_logits``, ``pred_boxes``, ``aux_outputs``,
                ``interm_outputs``, ``dn_meta`` ...), exactly as the official DINO produces it.
            targets: per image ``labels [n_i]`` int64 and ``boxes [n_i, 4]`` (cx, cy, w, h in 0..1),
                on the outputs' device.

        Returns:
            dict of unweighted scalar losses (see module docstring for the names).
        """
        device = outputs["pred_logits"].device
        counts = [len(t["labels"]) for t in targets]
        starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        target_labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.long)
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=torch.float32)
        num_boxes = self.num_boxes(targets, device)

        # decoder layers in order (the last is the main output), then the encoder proposals
        layers = [*outputs.get("aux_outputs", []), outputs]
        matched_sets = layers + ([outputs["interm_outputs"]] if "interm_outputs" in outputs else [])
        suffixes = [f"_{i}" for i in range(len(layers) - 1)] + [""] + (["_interm"] if len(matched_sets) > len(layers) else [])
        logits = torch.stack([o["pred_logits"] for o in matched_sets])
        boxes = torch.stack([o["pred_boxes"] for o in matched_sets])
        host = [_flatten_matches(self.matcher.match_sets(logits, boxes, target_labels, target_boxes, counts), starts)]

        dn_meta: Optional[Dict] = outputs.get("dn_meta")
        dn_outputs = dn_meta.get("output_known_lbs_bboxes") if dn_meta else None
        if dn_outputs is not None:
            num_groups = dn_meta["num_dn_group"]
            dn_indices = denoising_indices(counts, num_groups, dn_meta["pad_size"] // num_groups)
            dn_layers = [*dn_outputs["aux_outputs"], dn_outputs]
            host.append(_flatten_matches([dn_indices] * len(dn_layers), starts))

        # every index of the step reaches the device in one asynchronous copy
        sizes = [h.shape[1] for h in host]
        packed = host_transfer.to_device(np.concatenate([np.concatenate(host, 1).reshape(-1), np.asarray(counts, np.int64)]), device)
        columns, lengths = packed[:4 * sum(sizes)].view(4, -1), packed[4 * sum(sizes):].float()
        pairs = [_Pairs(*part) for part in columns.split(sizes, 1)]

        losses: Dict[str, torch.Tensor] = {}
        per_set = self.set_losses(logits, boxes, pairs[0], target_labels, target_boxes, lengths, num_boxes)
        for s, suffix in enumerate(suffixes):
            losses.update({f"{term}{suffix}": values[s] for term, values in per_set.items()})
        # class_error: top-1 accuracy of the main output's matched queries (logging only)
        main = len(layers) - 1
        first, count = int(np.searchsorted(host[0][0], main)), int((host[0][0] == main).sum())
        with torch.no_grad():
            p = pairs[0]
            rows = slice(first, first + count)
            main_logits = logits[main][p.batch_idx[rows], p.query_idx[rows]]
            losses["class_error"] = 100 - top1_accuracy(main_logits, target_labels[p.target_idx[rows]])

        if dn_outputs is not None:
            dn_logits = torch.stack([o["pred_logits"] for o in dn_layers])
            dn_boxes = torch.stack([o["pred_boxes"] for o in dn_layers])
            per_set = self.set_losses(dn_logits, dn_boxes, pairs[1], target_labels, target_boxes, lengths,
                                      num_boxes * num_groups)
            dn_suffixes = [f"_dn_{i}" for i in range(len(dn_layers) - 1)] + ["_dn"]
        else:
            zero = torch.zeros(len(layers), device=device)
            per_set = {term: zero for term in SET_TERMS}
            dn_suffixes = [f"_dn_{i}" for i in range(len(layers) - 1)] + ["_dn"]
        for s, suffix in enumerate(dn_suffixes):
            losses.update({f"{term}{suffix}": values[s] for term, values in per_set.items()})
        return losses

    def total_loss(self, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the losses that have a weight (one fused multiply and one sum)."""
        keys = [k for k in self.weight_dict if k in losses]
        weighted = torch._foreach_mul([losses[k] for k in keys], [float(self.weight_dict[k]) for k in keys])
        return torch.stack(weighted).sum()


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
