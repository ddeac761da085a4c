"""How a Ray Train worker group's datasets are split among its workers (``OrderedShards``): here, under
``data/``, so that the training job and the distributed evaluation both depend on it, neither on the other.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import ray.train

from dino_platform.run_state import (
    STATE_FILE, latest_registered_checkpoint, read_consumed_image_ids, read_state, redeal_needed,
)

log = logging.getLogger("dino.train")


class OrderedShards(ray.train.DataConfig):
    """A ``ray.train.DataConfig`` that splits every dataset in a reproducible order.

    ``preserve_order`` makes Ray Data's splitter deal blocks out deterministically (it otherwise
    follows locality and timing), which exact resume relies on. Training shards are equal-sized
    (every worker runs the same number of steps, so collectives never wait on a finished worker);
    evaluation shards are not, so no evaluation image is dropped.

    Resuming: the training pipeline draws each pass's augmentation and file order from the number
    of passes made so far, which a fresh split (a restarted worker group, a resumed job) would
    count from 0. ``run_location`` lets ``configure`` read the epoch of the checkpoint Ray Train
    resumes from (its checkpoint_manager_snapshot.json) and start the count there;
    ``start_epoch`` is the count when the run has no checkpoint of its own yet (a run started from
    another run's checkpoint, e.g. a PBT trial that cloned a better one).
    """

    def __init__(self, run_location=None, start_epoch: int = 0, start_location=None):
        super().__init__()
        self.run_location = run_location
        self.start_epoch = start_epoch
        self.start_location = start_location

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        resume = self._resume_point()
        passes_done = self.start_epoch if resume is None else resume[0]
        consumed = _remaining_to_redeal(resume, world_size)
        output: List[Dict[str, Any]] = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            if name == "train" and consumed is not None:
                dataset = dataset.map_batches(_drop_consumed, batch_format="numpy", fn_kwargs={
                    "image_ids": consumed, "on_pass": passes_done})
            dataset = dataset.copy(dataset)
            options = self.default_ingest_options()
            options.preserve_order = True
            dataset.context.execution_options = options
            if name == "train":
                # NOTE: private attribute; data.streaming and Ray Data's file shuffling read it
                dataset.context._execution_idx = passes_done
            for rank, split in enumerate(dataset.streaming_split(world_size, equal=(name == "train"))):
                output[rank][name] = split
        return output

    def _resume_point(self) -> Optional[Tuple[int, Any]]:
        """(epoch, checkpoint Location) the worker group resumes from, or None for a fresh start."""
        latest = latest_registered_checkpoint(self.run_location) if self.run_location is not None else None
        if latest is not None:
            epoch = int((latest.get("metrics") or {}).get("epoch", 0))
            return epoch, self.run_location.child(latest["checkpoint_dir_name"])
        if self.start_location is not None:
            return self.start_epoch, self.start_location
        return None


def _remaining_to_redeal(resume, world_size: int) -> Optional[np.ndarray]:
    """The epoch's already-trained image ids when this group must re-deal the rest (a resize), else None.

    Same world size, plain split: each worker skips its own consumed micro-batches (exact resume).
    Another size mid-epoch: the split changes, so the first pass drops the ids the checkpoint lists
    in ``data_position.json`` and ``streaming_split`` deals what remains equally to the new workers.
    """
    if resume is None or not resume[1].child(STATE_FILE).exists():
        return None
    saved = read_state(resume[1])
    consumed = read_consumed_image_ids(resume[1], saved.epoch) if redeal_needed(saved, world_size) else []
    if not consumed:
        return None
    log.info("re-dealing epoch %d to %d workers: %d images already trained on are skipped", saved.epoch,
             world_size, len(consumed))
    return np.asarray(consumed, dtype=np.int64)


def _drop_consumed(batch: Dict[str, np.ndarray], image_ids: np.ndarray, on_pass: int) -> Dict[str, np.ndarray]:
    """Ray Data task: on the resumed pass only, remove the rows whose image was already trained on."""
    from dino_platform.data.streaming import _execution_index

    if _execution_index() != on_pass:
        return batch
    keep = ~np.isin(batch["image_id"], image_ids)
    return {key: value[keep] for key, value in batch.items()}
