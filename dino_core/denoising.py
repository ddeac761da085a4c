"""Contrastive denoising (CDN) queries, DINO §3.3.

Each ground-truth box is fed to the decoder ``2 * num_groups`` times: in every group once as a
*positive* (box noise below ``box_noise_scale * (w/2, h/2)``, to be reconstructed) and once as a
*negative* (noise between 1x and 2x that, to be classified as background). Labels are flipped to a
random class with probability ``label_noise_ratio / 2``.

Layout of the ``pad_size`` denoising queries in front of the matching queries::

    [ group 0: positives (max_gt) | negatives (max_gt) ][ group 1: ... ] ... [ matching queries ]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from .box_ops import inverse_sigmoid


@dataclass
class DenoisingQueries:
    """The decoder inputs that denoising adds (``pad = pad_size``)."""

    labels_embedded: torch.Tensor  # [bs, pad, C]
    boxes_logit: torch.Tensor      # [bs, pad, 4] inverse-sigmoid of noised (cx, cy, w, h)
    attn_mask: torch.Tensor        # [pad + nq, pad + nq] bool, True = blocked
    meta: Dict                     # {"pad_size": int, "num_dn_group": int}


def num_denoising_groups(dn_number: int, max_gt: int) -> int:
    """Number of CDN groups for a batch whose largest image has ``max_gt`` boxes (>= 1).

    NOTE: the official rule, kept for parity: with ``dn_number >= 50`` the ``2 * dn_number`` query
    budget is split, ``(2 * dn_number) // (2 * max_gt)`` groups; below 50 it is *not* split and
    ``2 * dn_number`` groups are used whatever ``max_gt`` is.
    """
    if max_gt == 0:
        return 1
    groups = 2 * dn_number
    if groups >= 100:
        groups = groups // (2 * max_gt)
    return max(groups, 1)


def denoising_attn_mask(pad_size: int, num_groups: int, num_queries: int, device=None) -> torch.Tensor:
    """Self-attention mask ``[pad + nq, pad + nq]``, True where attention is blocked.

    Matching queries never see denoising queries (the GT would leak); denoising groups never see each
    other; denoising queries may see the matching queries.
    """
    size = pad_size + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    if pad_size == 0:
        return mask
    mask[pad_size:, :pad_size] = True
    group = torch.arange(pad_size, device=device) // (pad_size // num_groups)
    mask[:pad_size, :pad_size] = group[:, None] != group[None, :]
    return mask


def prepare_denoising_queries(
    targets: List[Dict[str, torch.Tensor]],
    dn_number: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    num_queries: int,
    num_classes: int,
    label_enc: nn.Embedding,
    generator: Optional[torch.Generator] = None,
) -> DenoisingQueries:
    """Build the CDN queries for a batch.

    Args:
        targets: per image ``labels [n_i]`` int64 and ``boxes [n_i, 4]`` (cx, cy, w, h in ``[0, 1]``).
        dn_number: denoising budget (official 100: ``2 * 100`` queries at most, split into groups).
        label_noise_ratio: probability x2 of replacing a label by a random class (official 0.5).
        box_noise_scale: box noise relative to half the box size (official scripts: 1.0).
        num_queries: matching queries after the denoising part.
        num_classes: labels are drawn from ``[0, num_classes)`` for label noise.
        label_enc: embedding of ``num_classes + 1`` rows for the query content.
        generator: optional RNG on ``label_enc``'s device for reproducible noise (None: the
            device's default generator, which ``torch.manual_seed`` seeds). The noise is drawn on
            the device, in the same order and shapes on every device, so a CPU generator with a
            given seed reproduces a CPU run exactly.
    """
    device = label_enc.weight.device
    hidden_dim = label_enc.embedding_dim
    batch_size = len(targets)
    counts = [int(t["labels"].numel()) for t in targets]
    max_gt = max(counts) if counts else 0
    num_groups = num_denoising_groups(dn_number, max_gt)
    pad_size = 2 * max_gt * num_groups

    labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.long)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=torch.float32)
    batch_idx = torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(counts)])
    total = labels.numel()
    repeats = 2 * num_groups  # one positive and one negative copy per group

    noised_labels = labels.repeat(repeats)
    noised_boxes = boxes.repeat(repeats, 1)
    if label_noise_ratio > 0 and total > 0:
        p = torch.rand(noised_labels.shape, generator=generator, device=device)
        flip = p < label_noise_ratio * 0.5
        random_labels = torch.randint(0, num_classes, noised_labels.shape, generator=generator, device=device)
        noised_labels = torch.where(flip, random_labels, noised_labels)
    if box_noise_scale > 0 and total > 0:
        xyxy = torch.cat([noised_boxes[:, :2] - noised_boxes[:, 2:] / 2, noised_boxes[:, :2] + noised_boxes[:, 2:] / 2], 1)
        half_wh = torch.cat([noised_boxes[:, 2:] / 2, noised_boxes[:, 2:] / 2], 1)
        sign = torch.randint(0, 2, noised_boxes.shape, generator=generator, device=device).to(torch.float32) * 2.0 - 1.0
        magnitude = torch.rand(noised_boxes.shape, generator=generator, device=device)
        # copies are ordered [pos, neg] per group: negatives sit in the odd blocks of `total` rows
        is_negative = (torch.arange(repeats * total, device=device) // total) % 2 == 1
        magnitude = magnitude + is_negative[:, None].float()
        xyxy = (xyxy + sign * magnitude * half_wh * box_noise_scale).clamp(min=0.0, max=1.0)
        noised_boxes = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)

    labels_embedded = torch.zeros(batch_size, pad_size, hidden_dim, device=device)
    boxes_logit = torch.zeros(batch_size, pad_size, 4, device=device)
    if total > 0:
        # position inside the image's block: [0..n_i) + max_gt * copy
        within = torch.cat([torch.arange(n, device=device) for n in counts])
        slot = (within[None, :] + max_gt * torch.arange(repeats, device=device)[:, None]).flatten()
        rows = batch_idx.repeat(repeats)
        labels_embedded[rows, slot] = label_enc(noised_labels)
        boxes_logit[rows, slot] = inverse_sigmoid(noised_boxes)
    attn_mask = denoising_attn_mask(pad_size, num_groups, num_queries, device)
    return DenoisingQueries(labels_embedded, boxes_logit, attn_mask, {"pad_size": pad_size, "num_dn_group": num_groups})
