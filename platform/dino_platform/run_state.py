"""Where a training run stood, as its checkpoints and run directory record it (read-only).

``train.checkpointing`` writes these records (its docstring shows a checkpoint's layout); the driver,
the data split and the workers read them here. A checkpoint directory is a local ``Path`` (a
worker's copy) or a storage ``Location``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from dino_platform.errors import StorageError
from dino_platform.storage import resolve

STATE_FILE = "train_state.json"
DATA_POSITION_FILE = "data_position.json"
STALLS_DIR = "stalls"  # <run_dir>/stalls/<session>-<time>-rank<r>.txt: the stall watchdog's reports
WORKER_GROUPS_DIR = "worker_groups"  # <run_dir>/worker_groups/start-*.json: one record per worker-group start


@dataclass
class TrainState:
    """Where training stands: enough to continue with the same step, data position and lr."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epoch in progress (or the next one when batches_in_epoch == 0)
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed on each worker
    seed: int = 0
    world_size: int = 0  # workers that wrote the checkpoint (ZeRO partitions are per worker); 0: not recorded
    steps_in_epoch: int = 0  # optimizer steps of `epoch` taken (the unit that survives a resize)
    # the epoch's remaining images were re-dealt after a resize: its shards do not follow the
    # plain split, so any restart within this epoch re-deals again
    epoch_redealt: bool = False

    @classmethod
    def from_json(cls, text) -> "TrainState":
        """Fields the file lacks take their defaults; fields this class lacks are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


@dataclass
class StartPoint:
    """A training checkpoint a new run continues from (``run_training(start_from=...)``)."""

    location: Any  # storage Location of the checkpoint directory (carries its filesystem to workers)
    step: int
    epoch: int


def redeal_needed(saved: TrainState, world_size: int) -> bool:
    """Whether a group of ``world_size`` workers continuing from ``saved`` re-deals the rest of the epoch.

    Same size, plain split: no, each worker skips what it consumed (bit-identical resume). Another
    size mid-epoch (or an epoch already re-dealt): yes; at an epoch boundary there is nothing to deal.
    """
    if saved.batches_in_epoch == 0:
        return False
    return saved.epoch_redealt or (saved.world_size not in (0, world_size))


def _record(directory, name: str):
    """The file ``name`` of a checkpoint directory (Path or Location): both have exists() and read_bytes()."""
    return directory / name if isinstance(directory, Path) else directory.child(name)


def read_state(directory) -> TrainState:
    """The ``TrainState`` of a checkpoint directory; a StorageError names it when it is not one."""
    state_file = _record(directory, STATE_FILE)
    if not state_file.exists():
        raise StorageError(f"{getattr(directory, 'uri', directory)}: not a dino training checkpoint (no {STATE_FILE}); "
                           "a run can only continue from a checkpoint_step* directory that `dino train` wrote")
    return TrainState.from_json(state_file.read_bytes())


def read_consumed_image_ids(directory, epoch: int) -> List[int]:
    """Image ids of ``epoch`` trained on before the checkpoint in ``directory`` ([] for another epoch)."""
    position_file = _record(directory, DATA_POSITION_FILE)
    if not position_file.exists():
        return []
    position = json.loads(position_file.read_bytes())
    return list(position["image_ids"]) if position.get("epoch") == epoch else []


def read_train_state(uri: str) -> StartPoint:
    """Where the training checkpoint directory ``uri`` stood; errors name the URI and what is missing."""
    location = resolve(uri)
    state = read_state(location)
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


def stall_reports(run_location, session: str) -> List[str]:
    """The stall watchdog reports the workers of one ``run_training`` call wrote, oldest first."""
    folder = run_location.child(STALLS_DIR)
    return [folder.child(name).read_bytes().decode() for name in folder.list_files(recursive=False)
            if name.startswith(f"{session}-")]


def worker_groups(run_location, session: str) -> List[Dict[str, Any]]:
    """The worker groups one ``run_training`` call started, in order (``loop._record_worker_group``)."""
    folder = run_location.child(WORKER_GROUPS_DIR)
    records = [json.loads(folder.child(name).read_bytes()) for name in folder.list_files(recursive=False)]
    return sorted((r for r in records if r.get("session") == session), key=lambda r: (r["step"], r["time_ns"]))
