"""Training checkpoints: DeepSpeed state for exact resume plus the model artifact (``model.artifact``).

Layout of one ``ray.train.Checkpoint`` directory (each rank writes its own files, Ray merges them)::

    deepspeed/           engine.save_checkpoint(): module, optimizer partitions, per-rank RNG-free state
    model.pt             the artifact's consolidated fp32 weights, official DINO key layout
    model_config.json    the artifact's model, data transform and class names (the training data's)
    optimizer.pt         the full (unpartitioned) fp32 Adam moments {"exp_avg/<param>": ..., "exp_avg_sq/<param>":
                         ..., "step": []}: with model.pt, what any other world size resumes from
    data_position.json   {"epoch": e, "image_ids": [...]}: the images of epoch e trained on so far (run_state)
    train_config.json    the job's resolved TrainConfig (model preset/overrides, data transform ...)
    train_state.json     run_state.TrainState: step, epoch, consumed micro-batches and steps, seed, world size

So a checkpoint directory is a model artifact: ``model.artifact.load_artifact(directory)`` builds it.

Resuming: a group of the checkpoint's own size loads ``deepspeed/`` (its ZeRO partitions fit) and
continues bit-identically. A group of another size (an elastic group after a lost or a returned
node) loads ``model.pt`` into the module before DeepSpeed wraps it and then writes the moments of
``optimizer.pt`` into whatever partitions its ZeRO stage made (DeepSpeed's
``safe_set_full_optimizer_state``), so ZeRO 0-3 all resume at any size; the epoch's remaining
images are re-dealt among the new workers (``data.sharding.OrderedShards``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from dino_platform.errors import ConfigError, StorageError
from dino_platform.model.artifact import MODEL_FILE, write_artifact
from dino_platform.model.config import ModelConfig
from dino_platform.run_state import DATA_POSITION_FILE, STATE_FILE, TrainState, read_state, redeal_needed

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.pt"
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
CONFIG_FILE = "train_config.json"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


def consolidated_state_dict(engine) -> Dict[str, torch.Tensor]:
    """The full fp32 ``state_dict`` of ``engine.module``, on every rank (a collective call).

    Trainable parameters come from the optimizer's fp32 master copy (DeepSpeed's
    ``safe_get_full_fp32_param``, which assembles ZeRO-1/2/3 partitions); frozen parameters and
    buffers are gathered (ZeRO-3) or read directly, then cast to fp32.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    full: Dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        value = safe_get_full_fp32_param(param) if param.requires_grad else None
        if value is None:
            if hasattr(param, "ds_id"):  # ZeRO-3 partitioned, not held by the optimizer
                with deepspeed.zero.GatheredParameters([param]):
                    value = param.data.clone()
            else:
                value = param.data
        full[name] = value.detach().to("cpu", torch.float32).clone()
    state = module.state_dict()
    for name, tensor in state.items():
        if name not in full:  # buffers (frozen batch-norm statistics ...)
            dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
            full[name] = tensor.detach().to("cpu", dtype).clone()
    # keep the module's own key order so the file diff-matches the official layout
    return {k: full[k] for k in state} | {k: v for k, v in full.items() if k not in state}


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO/bf16 wrappers (engine.optimizer itself without one)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def consolidated_optimizer_state(engine) -> Dict[str, torch.Tensor]:
    """The full fp32 Adam moments of every trainable parameter, on every rank (a collective call).

    ``{"exp_avg/<name>": [param shape], "exp_avg_sq/<name>": ..., "step": []}``. ZeRO 1-3 partitions
    are assembled by DeepSpeed's ``safe_get_full_optimizer_state``; without ZeRO (stage 0, fp32) the
    torch optimizer holds whole tensors already.
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    optimizer = _torch_optimizer(engine)
    _relink_fragments(engine)
    full: Dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        for key in ADAM_MOMENTS:
            value = safe_get_full_optimizer_state(param, key)
            if value is None:  # not partitioned by DeepSpeed
                value = optimizer.state.get(param, {}).get(key)
            if value is None:
                raise RuntimeError(f"{name}: no optimizer state {key!r} to checkpoint (before the first step?)")
            shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 keeps the full shape aside
            full[f"{key}/{name}"] = value.detach().to("cpu", torch.float32).reshape(shape).clone()
    steps = [state["step"] for state in optimizer.state.values() if "step" in state]
    full["step"] = torch.tensor(float(steps[0]) if steps else 0.0)
    return full


def write_checkpoint(engine, directory: Path, state: TrainState, model_state: Optional[Dict[str, torch.Tensor]],
                     config: Dict[str, Any], optimizer_state: Optional[Dict[str, torch.Tensor]] = None,
                     consumed_image_ids: Optional[list] = None) -> None:
    """Every rank: DeepSpeed state into ``directory/deepspeed``; rank 0 also passes ``model_state``,
    ``optimizer_state`` (``consolidated_optimizer_state``) and the epoch's consumed image ids.
    ``config``: the job's ``TrainConfig.to_dict()``."""
    engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=True)
    if model_state is not None:
        model, data = ModelConfig(**config.get("model", {})), config.get("data", {})
        write_artifact(directory, model_state, model, data.get("transform", {}),
                       _data_categories(data.get("eval_uri"), data.get("train_uri")))
        if optimizer_state is not None:
            torch.save(optimizer_state, directory / OPTIMIZER_FILE)
        position = {"epoch": state.epoch, "image_ids": sorted(int(i) for i in consumed_image_ids or [])}
        (directory / DATA_POSITION_FILE).write_text(json.dumps(position))
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        (directory / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=2))


def load_resized_weights(model: torch.nn.Module, directory: Path) -> None:
    """Before DeepSpeed wraps ``model``: the consolidated weights of a checkpoint written at another size."""
    model.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True), strict=True)


def restore_checkpoint(engine, directory: Path, world_size: int, accumulation: int = 1) -> TrainState:
    """Load the optimizer (and module) state and return where training stands for this group, its epoch
    position in this group's micro-batches (``accumulation`` per step). See "Resuming" above: at another
    size the module must already hold ``model.pt`` (``load_resized_weights``)."""
    state = read_state(directory)
    redealt = redeal_needed(state, world_size)
    if state.world_size in (0, world_size):
        load_path, _ = engine.load_checkpoint(
            str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_optimizer_states=True,
            load_lr_scheduler_states=False)
        if load_path is None:
            raise StorageError(f"{directory / DEEPSPEED_DIR}: DeepSpeed found no checkpoint with tag {DEEPSPEED_TAG!r}")
    elif not (directory / OPTIMIZER_FILE).is_file():
        raise ConfigError(
            f"scaling.num_workers: {directory.name} was written by {state.world_size} workers without "
            f"{OPTIMIZER_FILE} (an older checkpoint); resume with num_workers: {state.world_size}, or start a "
            f"new run with model.init_from pointing at {directory.name}/{MODEL_FILE}")
    else:
        restore_optimizer_moments(engine, torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
        engine.global_steps = state.step
        state.world_size, state.epoch_redealt = world_size, redealt
    if redealt:  # a resize mid-epoch, or a same-size restart within an already re-dealt epoch
        state.batches_in_epoch = state.steps_in_epoch * accumulation
    return state


def _relink_fragments(engine) -> None:
    # NOTE: ZeRO-1/2 (and bf16) link each parameter's view of the Adam state once, right after the
    # first param group's first step, so groups stepped later keep an empty view (DeepSpeed 0.19,
    # several param groups). Link again from the state as it is now.
    wrapper = engine.optimizer
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


def _set_zero3_partition(param, value: torch.Tensor, key: str) -> None:
    # NOTE: DeepSpeed 0.19's safe_set_full_optimizer_state slices past the end of a ZeRO-3 tensor
    # whose size the world size does not divide (its last partition is padded); write this rank's
    # padded slice through the local API instead.
    import torch.distributed as dist
    from deepspeed.utils import safe_set_local_optimizer_state

    size = param.ds_tensor.numel()
    rank = dist.get_rank() if dist.is_initialized() else 0
    piece = value.flatten()[rank * size:(rank + 1) * size]
    local = torch.zeros(size, dtype=torch.float32, device=param.ds_tensor.device)
    local[:piece.numel()] = piece
    safe_set_local_optimizer_state(param, local, key)


def restore_optimizer_moments(engine, full: Dict[str, torch.Tensor]) -> None:
    """Write consolidated Adam moments into this engine's optimizer, whatever its ZeRO partitioning."""
    from deepspeed.utils import safe_set_full_optimizer_state

    optimizer = _torch_optimizer(engine)
    # the (zero) Adam state a fresh engine makes only at its first step, keyed by the tensors the torch
    # optimizer updates: ZeRO-3's flat fp32 partitions, ZeRO-1/2's and bf16's flat fp32 groups, or the
    # module's own parameters; ZeRO-1/2 and bf16 then link each parameter's fragment to it
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    tensors = list(flats) if flats is not None else [p for group in optimizer.param_groups for p in group["params"]]
    for tensor in tensors:
        if not optimizer.state.get(tensor):
            optimizer.state[tensor] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(tensor),
                                       "exp_avg_sq": torch.zeros_like(tensor)}
    _relink_fragments(engine)
    step = full["step"]
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        for key in ADAM_MOMENTS:
            if f"{key}/{name}" not in full:
                raise StorageError(f"{OPTIMIZER_FILE}: no {key} for parameter {name} (a different model?)")
            value = full[f"{key}/{name}"]
            if hasattr(param, "ds_id"):  # ZeRO-3
                _set_zero3_partition(param, value, key)
            elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2, bf16 fragments
                safe_set_full_optimizer_state(param, value.to(param.device), key)
            else:
                optimizer.state[param][key] = value.to(param.device).clone()
    # every state entry (ZeRO-3 swaps its flat partitions in and out of param_groups around a step)
    for entry in optimizer.state.values():
        current = entry.get("step")
        entry["step"] = step.clone().to(current.device) if isinstance(current, torch.Tensor) else step.clone()


@functools.lru_cache(maxsize=4)
def _data_categories(*uris: Optional[str]) -> Dict[int, str]:
    """Class names from the first of the data's manifests that can be read ({}: the artifact's defaults)."""
    from dino_platform.data.manifest import read_manifest

    for uri in filter(None, uris):
        try:
            return dict(read_manifest(uri).categories)
        except Exception as exc:  # moved or unreachable data: the checkpoint is written without names
            log.debug("no category names from %s: %s", uri, exc)
    return {}
