"""The one place that decides where tensors handed to ``torch.distributed`` collectives live."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def collective_device(group: Optional[object] = None) -> torch.device:
    """The device whose tensors the process group's collectives accept.

    CPU for backends that take CPU tensors (gloo, MPI, UCC, and mixed ``"cpu:gloo,cuda:nccl"``
    groups); this process's current accelerator for the others (NCCL: ``cuda:<current device>``,
    which Ray Train sets per worker). CPU when no process group is initialised.

    NOTE: NCCL refuses CPU tensors ("No backend type associated with device type cpu"), so every
    collective in dino_core and the platform builds its tensors here instead of where it happens
    to be; gloo tests then run the very same lines.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    device_types = []
    for part in backend.split(","):
        if ":" in part:  # "cpu:gloo,cuda:nccl"
            device_types.append(part.split(":", 1)[0].strip())
        else:
            device_types.extend(dist.Backend.backend_capability.get(part.strip(), ["cpu"]))
    if "cpu" in device_types:
        return torch.device("cpu")
    device_type = device_types[0]
    return torch.device(device_type, getattr(torch, device_type).current_device())
