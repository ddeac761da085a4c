"""Resume at another world size: a checkpoint written by N workers restores into M, for ZeRO 0-3.

Three real Ray Train worker groups run one after another on the local Ray instance: 2 workers,
then 1, then 2 again. Each builds a DeepSpeed engine of every ZeRO stage (a small model, the
platform's DeepSpeed config at that world size), restores the previous group's checkpoint with
``train.checkpointing.restore_checkpoint``, records what it restored, trains two optimizer steps
with the accumulation that keeps the total batch, and checkpoints. After each resize the restored
consolidated weights and Adam moments must equal what the previous group saved, bit for bit.

Wall time: 210-296 s measured on 2 CPU cores shared with six other jobs (three worker-group starts,
twelve DeepSpeed engines); well under that on an idle CI machine.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

STAGES = (0, 1, 2, 3)
TOTAL_BATCH = 4  # 2 workers x 2 x accumulation 1 = 1 worker x 2 x accumulation 2


def _tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3))
    model.register_buffer("frozen_stat", torch.arange(3, dtype=torch.float32))
    return model


def _group(config):
    """Every rank of one worker group: for each ZeRO stage restore, record, train 2 steps, checkpoint."""
    import deepspeed
    import ray.train
    from dino_platform.run_state import TrainState
    from dino_platform.train.checkpointing import (
        consolidated_optimizer_state, consolidated_state_dict, load_resized_weights, restore_checkpoint,
        write_checkpoint,
    )
    from dino_platform.train.config import load_config
    from dino_platform.train.deepspeed_config import build_deepspeed_config
    from dino_platform.train.engine import skip_cpu_shm_comm_build

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    skip_cpu_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    inputs = torch.linspace(-1, 1, 8 * 4).reshape(8, 4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for stage in STAGES:
        cfg = load_config({"data": {"train_uri": "unused"},
                           "scaling": {"num_workers": [1, 2], "batch_size_per_worker": 2},
                           "deepspeed": {"zero_stage": stage}}).at_world_size(world_size)
        accumulation = cfg.scaling.accumulation_steps
        model = _tiny_model()
        previous = Path(config["previous"]) / f"zero{stage}" if config["previous"] else None
        if previous is not None:
            load_resized_weights(model, previous)
        # two param groups, as DINO's backbone/rest split: ZeRO steps (and links state) per group
        optimizer = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-3},
                                       {"params": [p for m in list(model)[1:] for p in m.parameters()]}],
                                      lr=1e-2, weight_decay=1e-4)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=build_deepspeed_config(cfg),
                                          dist_init_required=False)
        state = TrainState(world_size=world_size)
        if previous is not None:
            state = restore_checkpoint(engine, previous, world_size, accumulation)
            restored = {**consolidated_state_dict(engine), **consolidated_optimizer_state(engine)}
            if rank == 0:
                torch.save(restored, Path(config["out"]) / f"restored_zero{stage}.pt")
        for _ in range(2):
            for micro in range(accumulation):
                # the global step's 4 samples, dealt to (rank, micro-batch) so the step sees all of them
                first = (state.step * TOTAL_BATCH + (micro * world_size + rank) * 2) % 8
                loss = torch.nn.functional.cross_entropy(engine(inputs[first:first + 2]), labels[first:first + 2])
                engine.backward(loss)
                engine.step()
            state.step += 1
        state.steps_in_epoch = state.step
        state.batches_in_epoch = state.step * accumulation
        model_state = consolidated_state_dict(engine)
        optimizer_state = consolidated_optimizer_state(engine)
        directory = Path(config["out"]) / f"zero{stage}"
        directory.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        write_checkpoint(engine, directory, state, model_state if rank == 0 else None, {},
                         optimizer_state if rank == 0 else None, [])
        torch.distributed.barrier()


def _run_group(ray_local, num_workers: int, previous, out: Path) -> None:
    import sys

    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    out.mkdir(parents=True)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    TorchTrainer(
        _group, train_loop_config={"previous": str(previous) if previous else None, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, resources_per_worker={"CPU": 0.5}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(name=out.name, storage_path=str(out.parent / "ray")),
    ).fit()


def test_two_one_two_workers_restore_weights_and_adam_moments_for_every_zero_stage(ray_local, tmp_path):
    groups = [("two", 2), ("one", 1), ("two_again", 2)]
    previous = None
    for name, workers in groups:
        _run_group(ray_local, workers, previous, tmp_path / name)
        previous = tmp_path / name
    for index, ((before, _), (after, workers)) in enumerate(zip(groups, groups[1:])):
        for stage in STAGES:
            saved = {**torch.load(tmp_path / before / f"zero{stage}" / "model.pt", weights_only=True),
                     **torch.load(tmp_path / before / f"zero{stage}" / "optimizer.pt", weights_only=True)}
            restored = torch.load(tmp_path / after / f"restored_zero{stage}.pt", weights_only=True)
            assert sorted(saved) == sorted(restored)
            assert any(k.startswith("exp_avg_sq/") for k in saved)
            assert float(saved["step"]) == 2 * (index + 1)  # Adam's step count travels too
            for key in saved:
                assert torch.equal(saved[key], restored[key]), (stage, before, after, key)
            state = json.loads((tmp_path / after / f"zero{stage}" / "train_state.json").read_text())
            assert state["world_size"] == workers
        # training went on from there: the moments moved
        assert not torch.equal(torch.load(tmp_path / after / "zero2" / "optimizer.pt", weights_only=True)["exp_avg/0.weight"],
                               torch.load(tmp_path / before / "zero2" / "optimizer.pt", weights_only=True)["exp_avg/0.weight"])
