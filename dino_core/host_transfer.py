"""Host -> device transfers that do not stall the host: the one way small host data reaches the device.

A plain ``torch.tensor(values, device="cuda")`` or ``cpu_tensor.to("cuda")`` copies from pageable
memory, which blocks the host until the device has caught up with everything queued before it. Staging
the values in pinned memory and copying with ``non_blocking=True`` queues the copy behind the queued
kernels instead. On CPU devices the values are used in place.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

HostValues = Union[np.ndarray, Sequence, torch.Tensor]


def to_device(values: HostValues, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``values`` (numpy array, nested Python sequence or CPU tensor) as a ``dtype`` tensor on ``device``.

    The host buffer is pinned and copied asynchronously when ``device`` is an accelerator; the
    caller must not modify ``values`` afterwards.
    """
    if isinstance(values, torch.Tensor):
        host = values.to(dtype)
    elif isinstance(values, np.ndarray):
        host = torch.from_numpy(np.ascontiguousarray(values)).to(dtype)
    else:
        host = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)
