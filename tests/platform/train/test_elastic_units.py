"""Elastic-training pieces without a cluster: when an epoch is re-dealt, what is dropped, how
restarts and resizes are counted, and the lost-node message."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from dino_platform.run_state import DATA_POSITION_FILE, STATE_FILE, TrainState, redeal_needed


def test_an_epoch_is_re_dealt_only_mid_epoch_at_another_size_or_once_re_dealt():
    mid = TrainState(step=5, epoch=1, batches_in_epoch=2, world_size=2, steps_in_epoch=1)
    assert not redeal_needed(mid, 2)  # same size, plain split: each worker skips its own batches
    assert redeal_needed(mid, 1) and redeal_needed(mid, 3)
    assert not redeal_needed(dataclasses.replace(mid, batches_in_epoch=0, steps_in_epoch=0), 1)  # epoch boundary
    assert redeal_needed(dataclasses.replace(mid, epoch_redealt=True), 2)  # the split changed already
    assert not redeal_needed(dataclasses.replace(mid, world_size=0), 1)  # a checkpoint without a recorded size


def test_train_state_fields_missing_from_the_file_take_their_defaults():
    without_resize_fields = {"step": 3, "epoch": 0, "batches_in_epoch": 3, "seed": 1, "world_size": 2}
    state = TrainState.from_json(json.dumps(without_resize_fields))
    assert state.steps_in_epoch == 0 and not state.epoch_redealt


def test_resumed_pass_drops_the_consumed_images_and_later_passes_keep_all(tmp_path, monkeypatch):
    from dino_platform.data import sharding
    from dino_platform.storage import resolve

    checkpoint = tmp_path / "checkpoint_step0000003"
    checkpoint.mkdir()
    state = TrainState(step=3, epoch=1, batches_in_epoch=2, world_size=2, steps_in_epoch=1)
    (checkpoint / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))
    (checkpoint / DATA_POSITION_FILE).write_text(json.dumps({"epoch": 1, "image_ids": [4, 7]}))
    resume = (1, resolve(str(checkpoint)))
    assert sharding._remaining_to_redeal(resume, 2) is None  # same size: no re-deal
    consumed = sharding._remaining_to_redeal(resume, 1)
    assert sorted(consumed.tolist()) == [4, 7]

    batch = {"image_id": np.array([3, 4, 5, 7]), "image": np.array([np.zeros((3, 2, 2))] * 4 + [None], dtype=object)[:4]}
    monkeypatch.setattr("dino_platform.data.streaming._execution_index", lambda: 1)
    kept = sharding._drop_consumed(batch, consumed, on_pass=1)
    assert kept["image_id"].tolist() == [3, 5] and len(kept["image"]) == 2
    monkeypatch.setattr("dino_platform.data.streaming._execution_index", lambda: 2)  # the next epoch
    assert sharding._drop_consumed(batch, consumed, on_pass=1)["image_id"].tolist() == [3, 4, 5, 7]


def test_restarts_and_resizes_are_counted_from_the_worker_group_records():
    from dino_platform.train.trainer import TrainingOutcome

    groups = [{"world_size": 2}, {"world_size": 1}, {"world_size": 1}, {"world_size": 2}]
    outcome = TrainingOutcome(None, None, "run", None, None, worker_groups=groups)
    assert (outcome.restarts, outcome.resizes) == (3, 2)
    assert (TrainingOutcome(None, None, "run", None, None).restarts, TrainingOutcome(
        None, None, "run", None, None).resizes) == (0, 0)


@pytest.mark.parametrize("text, expected", [
    ("The actor died because its node has died. Node Id: 2b5e8d0f6a1c4e7b9d3f5a2c8e1b4d6f7a9c0e3b5d7f9a1c\n"
     "\tthe actor's node was terminated unexpectedly (ip=10.0.0.7)",
     ["node 2b5e8d0f6a1c4e7b9d3f5a2c8e1b4d6f7a9c0e3b5d7f9a1c (10.0.0.7)"]),
    ("ValueError: a bug in the training function", []),
])
def test_lost_nodes_are_named_from_ray_trains_error(text, expected):
    from dino_platform.train.trainer import lost_nodes

    class Failed(Exception):
        worker_failures = {1: RuntimeError(text)}

    assert lost_nodes(Failed()) == expected
