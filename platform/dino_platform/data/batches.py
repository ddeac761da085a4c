"""Collated batches from a worker's dataset shard (samples from ``data.streaming``, in shard order)."""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dino_platform.data.streaming import collate, skipped_samples
from dino_platform.errors import DataError

Batch = Tuple[torch.Tensor, torch.Tensor, List[Dict[str, torch.Tensor]]]


def iter_collated(shard, batch_size: int, drop_last: bool, normalization: Tuple[Sequence[float], Sequence[float]],
                  on_skipped: Optional[Callable[[List[Tuple[int, str]]], None]] = None) -> Iterator[Batch]:
    """``(images [B,3,H,W], mask [B,H,W] True=padding, targets)`` batches, in the shard's row order.

    ``normalization``: the (mean, std) of the job's transform config, applied by ``collate``.
    Samples that ``data.on_sample_error: skip`` left out are not in the batches; ``on_skipped``
    gets their ``(image_id, error)``. A batch left with no sample is not yielded when
    ``drop_last`` is False (evaluation); in training (``drop_last``) it raises, since every rank
    must take the same number of steps.
    """
    mean, std = normalization
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last):
        skipped = skipped_samples(batch)
        if skipped and on_skipped is not None:
            on_skipped(skipped)
        if len(skipped) == len(batch["image_id"]):
            if drop_last:
                raise DataError(f"every sample of a training micro-batch of {len(skipped)} failed and was skipped "
                                f"(first: {skipped[0][1]}); a larger batch_size_per_worker or a fix of the data "
                                "is needed")
            continue
        yield collate(batch, mean=mean, std=std)


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[3, h, w] network input normalised with ``mean``/``std`` -> [h, w, 3] uint8 picture."""
    mean = torch.tensor(mean).view(3, 1, 1)
    std = torch.tensor(std).view(3, 1, 1)
    pixels = (image.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(1, 2, 0).numpy()
