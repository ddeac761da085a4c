"""Every tensor handed to a torch.distributed collective lives on ``collective_device()``.

NCCL takes CUDA tensors only ("No backend type associated with device type cpu"); a gloo test cannot
see a CPU tensor passed to it, so the rule is one function, checked two ways: its mapping from
backend to device, and, with ``torch.distributed`` wrapped, the device of everything the training
path's collectives receive (criterion, progress report, DeepSpeed's ZeRO-2 step and consolidation).
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from torch import nn

from dino_core.distributed import collective_device

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "gather", "scatter", "all_to_all_single", "gather_object",
               "all_gather_object", "broadcast_object_list")


@pytest.mark.parametrize("backend,device", [
    ("gloo", torch.device("cpu")),
    ("nccl", torch.device("cuda", 3)),
    ("cpu:gloo,cuda:nccl", torch.device("cpu")),
    ("mpi", torch.device("cpu")),
])
def test_collective_device_follows_the_backend(monkeypatch, backend, device):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # Ray Train's set_device per worker
    assert collective_device() == device


def test_collective_device_without_a_process_group():
    if not dist.is_initialized():
        assert collective_device() == torch.device("cpu")


# process_group: the session-wide gloo group of tests/conftest.py


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


@pytest.fixture
def collective_calls(process_group, monkeypatch):
    """``torch.distributed`` with every collective recording ``(name, [devices of its tensors])``."""
    calls = []
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def wrapper(*args, _name=name, _original=original, **kwargs):
            calls.append((_name, [t.device for t in _tensors(list(args) + list(kwargs.values()))]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(dist, name, wrapper)
    return calls


def _assert_on_collective_device(calls):
    expected = collective_device()
    wrong = [(name, devices) for name, devices in calls if any(d != expected for d in devices)]
    assert not wrong, f"tensors off {expected}: {wrong}"


def test_training_collectives_take_tensors_on_the_collective_device(collective_calls):
    import deepspeed

    import dino_core
    from dino_platform.train.checkpointing import consolidated_state_dict
    from dino_platform.train.config import load_config
    from dino_platform.train.deepspeed_config import build_deepspeed_config
    from dino_platform.train.engine import skip_cpu_shm_comm_build
    from dino_platform.train.loop import _Progress

    # the criterion's num_boxes
    _, criterion, _ = dino_core.build_model("dino_tiny", num_classes=91)
    targets = [{"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    losses = criterion({"pred_logits": torch.randn(1, 10, 91), "pred_boxes": torch.rand(1, 10, 4) * 0.5 + 0.25,
                        "dn_meta": None}, targets)
    assert [name for name, _ in collective_calls] == ["all_reduce"]

    # the progress report's mean over workers (the call that failed under NCCL)
    progress = _Progress(world_size=1, batch_size=1)
    progress.add_micro_batch(losses["loss_ce"] * 2, losses)
    metrics = progress.mean_over_workers()
    assert metrics["loss"] == pytest.approx(2 * float(losses["loss_ce"]))
    assert len(collective_calls) == 2

    # DeepSpeed's own: a ZeRO-2 step and the consolidated fp32 state dict
    cfg = load_config({"data": {"train_uri": "x"}, "deepspeed": {"zero_stage": 2},
                       "scaling": {"num_workers": 1, "batch_size_per_worker": 2}})
    skip_cpu_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=build_deepspeed_config(cfg), dist_init_required=False)
    engine.backward(engine(torch.randn(2, 4)).square().mean())
    engine.step()
    consolidated_state_dict(engine)
    assert len(collective_calls) > 2
    _assert_on_collective_device(collective_calls)
