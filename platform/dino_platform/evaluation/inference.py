"""Inference over one worker's evaluation shard, and gathering the results on rank 0.

NOTE (padding, DINO issue #231): in a padded batch the backbone's convolutions see the padded
border as image content (after the first normalisation layer it is no longer zero), so an image's
detections change with whatever it was batched with (an untrained dino_tiny, 96x128 image padded
to 128x128: logits moved by up to 1.25, normalised boxes by up to 0.94, top-k query selection
amplifying the feature change). Batching equal-sized images without padding still moves outputs
by ~1e-6 (different BLAS blocking). So, as the official evaluation does (batch size 1), every image
is run on its own, cropped to its valid region: the evaluation batch size and the number of workers
change only how images are loaded and spread, never the predictions.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dino_platform.evaluation.coco_eval import Detections, ImagePrediction
from dino_platform.model.detector import run_alone


def valid_sizes(mask: torch.Tensor) -> List[Tuple[int, int]]:
    """(h, w) of each image's unpadded region; mask: [B, H, W] bool, True = padding (bottom/right)."""
    return [(int(valid.any(dim=1).sum()), int(valid.any(dim=0).sum())) for valid in ~mask]


@torch.no_grad()
def predict_batch(
    model: torch.nn.Module,
    postprocessor: torch.nn.Module,
    images: torch.Tensor,
    mask: torch.Tensor,
    targets: Sequence[Dict[str, torch.Tensor]],
    max_detections: Optional[int] = None,
) -> List[ImagePrediction]:
    """Detections for a collated batch, each image run alone at its own valid size.

    images: [B, 3, H, W] normalized; mask: [B, H, W] bool (True = padding, bottom/right);
    targets carry ``image_id`` and ``orig_size`` (h, w). Returned boxes are (x0, y0, x1, y1) in
    original-image pixels, by descending score: all ``num_select`` of the postprocessor (the official
    protocol), or the best ``max_detections``.
    """
    predictions = []
    for i, (h, w) in enumerate(valid_sizes(mask)):
        result = run_alone(model, postprocessor, images[i : i + 1, :, :h, :w], targets[i]["orig_size"])
        keep = torch.argsort(result["scores"], descending=True, stable=True)[:max_detections]
        predictions.append(ImagePrediction(
            image_id=_image_id(targets[i]),
            boxes=result["boxes"][keep].float().cpu().numpy(),
            scores=result["scores"][keep].float().cpu().numpy(),
            labels=result["labels"][keep].cpu().numpy(),
        ))
    return predictions


def gather_detections(detections: Detections) -> Optional[Detections]:
    """Every rank's detections concatenated on rank 0 (others get None), as columnar arrays.

    Each rank sends five arrays, not one object per box: at Objects365 validation scale (80k images
    x 300 detections) a dict per box would be 24M Python objects on rank 0.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return detections
    gathered: Optional[List[Detections]] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(detections, gathered, dst=0)
    return None if gathered is None else Detections.concat(gathered)


def _image_id(target: Dict) -> object:
    value = target["image_id"]
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    return value
