"""Collated batches from a worker's dataset shard (samples from ``data.streaming``, in shard order)."""
from __future__ import annotations

from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch

Batch = Tuple[torch.Tensor, torch.Tensor, List[Dict[str, torch.Tensor]]]


def iter_collated(shard, batch_size: int, drop_last: bool, normalization: Tuple[Sequence[float], Sequence[float]]
                  ) -> Iterator[Batch]:
    """``(images [B,3,H,W], mask [B,H,W] True=padding, targets)`` batches, in the shard's row order.

    ``normalization``: the (mean, std) of the job's transform config, applied by ``collate``.
    """
    from dino_platform.data.streaming import collate

    mean, std = normalization
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last):
        yield collate(batch, mean=mean, std=std)


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[3, h, w] network input normalised with ``mean``/``std`` -> [h, w, 3] uint8 picture."""
    mean = torch.tensor(mean).view(3, 1, 1)
    std = torch.tensor(std).view(3, 1, 1)
    pixels = (image.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(1, 2, 0).numpy()
