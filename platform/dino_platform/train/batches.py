"""Collated batches from a worker's dataset shard (rows from ``data.streaming``, in shard order)."""
from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch

# the official DINO normalisation (ImageNet statistics), used to turn network inputs back into pictures
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Batch = Tuple[torch.Tensor, torch.Tensor, List[Dict[str, torch.Tensor]]]


def iter_collated(shard, batch_size: int, drop_last: bool) -> Iterator[Batch]:
    """``(images [B,3,H,W], mask [B,H,W] True=padding, targets)`` batches, in the shard's row order."""
    from dino_platform.data.streaming import collate

    rows = []
    for row in shard.iter_rows():
        rows.append(row)
        if len(rows) == batch_size:
            yield collate(rows)
            rows = []
    if rows and not drop_last:
        yield collate(rows)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """[3, h, w] normalised network input -> [h, w, 3] uint8 picture."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (image.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(1, 2, 0).numpy()
