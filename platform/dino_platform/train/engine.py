"""Model, optimizer and DeepSpeed engine for one worker (the edges of the training loop)."""
from __future__ import annotations

import hashlib
import logging
import random
from typing import List, Tuple

import numpy as np
import torch

from dino_platform.model.config import ModelConfig
from dino_platform.train.config import OptimConfig, TrainConfig
from dino_platform.train.deepspeed_config import build_deepspeed_config

log = logging.getLogger(__name__)


def init_weights(model: torch.nn.Module, model_cfg: ModelConfig, location) -> None:
    """Load ``model.init_from`` (official .pth or platform model.pt, resolved to ``location``)
    with dino_core's class transfer options."""
    import dino_core

    from dino_platform.model.artifact import read_model_state

    report = dino_core.load_official_state_dict(model, read_model_state(location), strict=model_cfg.init_strict,
                                                class_map=model_cfg.init_class_map or None)
    log.info("initialised from %s (%s)", model_cfg.init_from, report)


def lr_factor(optim: OptimConfig, epoch: int) -> float:
    """Step decay: the official StepLR(lr_drop) stepped once per epoch."""
    return optim.lr_drop_factor ** (epoch // optim.lr_drop)


def set_epoch_lr(optimizer: torch.optim.Optimizer, base_lrs: List[float], optim: OptimConfig, epoch: int) -> None:
    """Set each param group's lr for ``epoch``; ``base_lrs`` are the groups' undecayed rates, in order."""
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * lr_factor(optim, epoch)


def seed_step(seed: int, micro_step: int, rank: int) -> None:
    """Seed every RNG from (seed, micro step, rank): denoising noise and dropout replay exactly on resume."""
    digest = hashlib.sha256(f"{seed}:{micro_step}:{rank}".encode()).digest()
    value = int.from_bytes(digest[:8], "little") % (2**63 - 1)
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % (2**32))


def skip_cpu_shm_comm_build() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce extension on CPU.

    DeepSpeed's TorchBackend builds ``deepspeed_shm_comm`` (g++, 40-290 s on small machines) on
    every CPU start unless the op is marked incompatible in ``deepspeed.ops.__compatible_ops__``,
    the table it consults before building. The op only serves ``inference_all_reduce`` (tensor-
    parallel inference); training collectives go through torch.distributed (gloo) either way.
    """
    if torch.cuda.is_available():
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the official recipe's groups (backbone at lr_backbone, optional linear-proj mult), fused:
    one kernel per step and no host-side step counters."""
    import dino_core

    mult = optim.lr_linear_proj_mult if optim.scale_linear_proj_lr else 1.0
    groups = dino_core.param_groups(model, lr=optim.lr, lr_backbone=optim.lr_backbone, lr_linear_proj_mult=mult,
                                    weight_decay=optim.weight_decay)
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay, fused=True)


def build_engine(model: torch.nn.Module, cfg: TrainConfig) -> Tuple[object, List[float]]:
    """Wrap ``model`` in a DeepSpeed engine on the process group Ray Train already created; returns the
    engine and the param groups' base learning rates (for the step decay)."""
    import deepspeed

    skip_cpu_shm_comm_build()
    if torch.cuda.is_available():  # TF32 matmuls and convolutions as deepspeed.tf32 says
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.deepspeed.tf32
        log.info("float32 matmuls and convolutions: %s (deepspeed.tf32: %s, precision %s)",
                 "TF32" if cfg.deepspeed.tf32 else "full fp32", cfg.deepspeed.tf32, cfg.deepspeed.precision)
    # Ray Train has initialised torch.distributed; DeepSpeed adopts that group instead of making one
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False)
    optimizer = build_optimizer(model, cfg.optim)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=build_deepspeed_config(cfg), dist_init_required=False
    )
    return engine, base_lrs
