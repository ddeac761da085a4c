"""Box conversions and (generalised) IoU. Boxes are ``[..., 4]`` tensors."""
from __future__ import annotations

import torch


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``(cx, cy, w, h)`` -> ``(x0, y0, x1, y1)``; shape ``[..., 4]`` preserved."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``(x0, y0, x1, y1)`` -> ``(cx, cy, w, h)``; shape ``[..., 4]`` preserved."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of ``[N, 4]`` xyxy boxes -> ``[N]``."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU and union of xyxy boxes ``[N, 4]`` x ``[M, 4]`` -> (``[N, M]``, ``[N, M]``)."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    union = area1[:, None] + area2 - inter
    return inter / (union + 1e-6), union


def _well_formed(*boxes: torch.Tensor) -> bool:
    return all(bool((b[:, 2:] >= b[:, :2]).all()) for b in boxes)


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU of xyxy boxes ``[N, 4]`` x ``[M, 4]`` -> ``[N, M]`` in ``[-1, 1]``.

    The ``1e-6`` terms match the official DINO implementation (they matter for parity). Degenerate
    boxes raise ``ValueError`` on CPU tensors; on an accelerator that check would stall the host
    (~20 calls per training step), so it is skipped there: a diverged model shows up as non-finite
    matching costs (the matcher's assignment refuses them) and losses (the training loop stops).
    """
    if boxes1.device.type == "cpu" and not _well_formed(boxes1, boxes2):
        raise ValueError(
            "generalized_box_iou: degenerate boxes (x1 < x0 or y1 < y0, or NaN); "
            "check the target boxes are (cx, cy, w, h) with w, h >= 0 and that the model did not diverge"
        )
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[:, :, 0] * wh[:, :, 1]
    return iou - (area - union) / (area + 1e-6)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """``logit(x)`` with ``x`` clamped into ``[eps, 1 - eps]`` (as DINO does for box refinement)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
