"""How a Ray Train worker group's datasets are split among its workers.

``OrderedShards`` is the ``dataset_config`` of every ``TorchTrainer`` the platform starts: the
training job's (``train.trainer``) and the distributed evaluation's (``evaluation.runner``). It
lives under ``data/`` so that both depend on it, and neither on the other.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import ray.train


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

    def __init__(self, run_location=None, start_epoch: int = 0):
        super().__init__()
        self.run_location = run_location
        self.start_epoch = start_epoch

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        passes_done = _resume_epoch(self.run_location) if self.run_location is not None else None
        if passes_done is None:
            passes_done = self.start_epoch
        output: List[Dict[str, Any]] = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
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


def _resume_epoch(run_location) -> Optional[int]:
    """Epoch of the latest registered checkpoint of the run at ``run_location`` (None if none)."""
    from dino_platform.train.checkpoint import latest_registered_checkpoint

    latest = latest_registered_checkpoint(run_location)
    return None if latest is None else int((latest.get("metrics") or {}).get("epoch", 0))
