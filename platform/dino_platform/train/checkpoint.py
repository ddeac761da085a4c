"""Training checkpoints: DeepSpeed state for exact resume plus a consolidated fp32 ``model.pt``.

Layout of one ``ray.train.Checkpoint`` directory (each rank writes its own files, Ray merges them)::

    deepspeed/         engine.save_checkpoint(): module, optimizer partitions, per-rank RNG-free state
    model.pt           {name: fp32 tensor} in the official DINO key layout (torch.load(weights_only=True))
    train_config.json  the job's resolved TrainConfig (model preset/overrides, data transform ...)
    train_state.json   step, epoch, micro-batches consumed in that epoch, seed

``model.pt`` needs neither DeepSpeed nor Ray: ``dino_core.load_official_state_dict(model, path)``.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from dino_platform.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
CONFIG_FILE = "train_config.json"
STATE_FILE = "train_state.json"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


@dataclass
class TrainState:
    """Where training stands: enough to continue with the same step, data position and lr."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epoch in progress (or the next one when batches_in_epoch == 0)
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed on each worker
    seed: int = 0
    world_size: int = 0  # workers that wrote the checkpoint (ZeRO partitions are per worker)


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
    for name, tensor in module.state_dict().items():
        if name not in full:  # buffers (frozen batch-norm statistics ...)
            is_float = tensor.is_floating_point()
            full[name] = tensor.detach().to("cpu", torch.float32 if is_float else tensor.dtype).clone()
    # keep the module's own key order so the file diff-matches the official layout
    order = list(module.state_dict().keys())
    return {k: full[k] for k in order if k in full} | {k: v for k, v in full.items() if k not in order}


def write_checkpoint(
    engine,
    directory: Path,
    state: TrainState,
    model_state: Optional[Dict[str, torch.Tensor]],
    config: Optional[Dict[str, Any]],
) -> None:
    """Every rank: DeepSpeed state into ``directory/deepspeed``; rank 0 also passes ``model_state``."""
    engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=True)
    if model_state is not None:
        torch.save(model_state, directory / MODEL_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        (directory / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=2))


def restore_checkpoint(engine, directory: Path, world_size: int) -> TrainState:
    """Load DeepSpeed's module/optimizer state and return where training stood."""
    state_file = directory / STATE_FILE
    if not state_file.is_file():
        raise StorageError(f"{directory}: not a dino training checkpoint (no {STATE_FILE})")
    state = TrainState(**json.loads(state_file.read_text()))
    if state.world_size and state.world_size != world_size:
        raise ConfigError(
            f"scaling.num_workers: the run's checkpoints were written by {state.world_size} workers and "
            f"ZeRO state is partitioned per worker; resume with num_workers: {state.world_size}, or start a "
            f"new run with model.init_from pointing at {directory.name}/{MODEL_FILE}"
        )
    load_path, _ = engine.load_checkpoint(
        str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if load_path is None:
        raise StorageError(f"{directory / DEEPSPEED_DIR}: DeepSpeed found no checkpoint with tag {DEEPSPEED_TAG!r}")
    return state


# ---------------------------------------------------------------------------------------------
# reading model weights from anywhere (local path, s3://, a checkpoint directory)


def weights_location(uri: str):
    """The storage Location of the weights file ``uri`` names: itself, or ``model.pt`` inside it.

    Resolve on the driver and hand the Location to workers: it carries its filesystem (and S3
    settings), so workers need not share the driver's AWS environment.
    """
    from dino_platform.storage import resolve

    location = resolve(uri)
    if location.is_file():
        return location
    candidate = location.child(MODEL_FILE)
    if not candidate.is_file():
        raise StorageError(f"{uri}: neither a weights file nor a checkpoint directory with {MODEL_FILE}")
    return candidate


def read_model_state(source) -> Dict[str, torch.Tensor]:
    """Weights from a URI or Location (``model.pt``, a checkpoint directory, an official ``.pth``), loaded safely.

    Official files wrap the weights as ``{"model": state_dict, ...}``; that wrapper is removed.
    """
    location = weights_location(source) if isinstance(source, str) else source
    try:
        obj = torch.load(io.BytesIO(location.read_bytes()), map_location="cpu", weights_only=True)
    except StorageError:
        raise
    except Exception as exc:  # pickle errors, truncated files, non-tensor payloads
        raise StorageError(f"{location.uri}: cannot be read as model weights ({exc.__class__.__name__}: {exc})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise StorageError(f"{location.uri}: expected a state_dict (name -> tensor)")
    return obj


def read_train_config(uri: str) -> Optional[Dict[str, Any]]:
    """``train_config.json`` of a platform checkpoint (beside its ``model.pt``); None for official files."""
    from dino_platform.storage import resolve

    location = resolve(uri)
    if location.is_file():
        parent = uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."
        location = resolve(parent)
    config_file = location.child(CONFIG_FILE)
    if not config_file.exists():
        return None
    return json.loads(config_file.read_bytes())


@dataclass
class StartPoint:
    """A training checkpoint a new run continues from (``run_training(start_from=...)``)."""

    location: Any  # storage Location of the checkpoint directory (carries its filesystem to workers)
    step: int
    epoch: int


def read_train_state(uri: str) -> StartPoint:
    """Where the training checkpoint directory ``uri`` stood; errors name the URI and what is missing."""
    from dino_platform.storage import resolve

    location = resolve(uri)
    state_file = location.child(STATE_FILE)
    if not state_file.exists():
        raise StorageError(f"{uri}: not a dino training checkpoint (no {STATE_FILE}); a run can only continue "
                           f"from a checkpoint_step* directory that `dino train` wrote")
    state = TrainState(**json.loads(state_file.read_bytes()))
    return StartPoint(location=location, step=state.step, epoch=state.epoch)


def latest_registered_checkpoint(run_location) -> Optional[Dict[str, Any]]:
    """Ray Train's record of the checkpoint it resumes the run at ``run_location`` from, or None.

    ``{"checkpoint_dir_name": "checkpoint_step0000004", "metrics": {"step": 4, "epoch": 1, ...}}``,
    read from the run's ``checkpoint_manager_snapshot.json`` (written once every rank has reported).
    """
    snapshot = run_location.child("checkpoint_manager_snapshot.json")
    if not snapshot.exists():
        return None
    latest = json.loads(snapshot.read_bytes()).get("latest_checkpoint_result") or {}
    return latest if latest.get("checkpoint_dir_name") else None
