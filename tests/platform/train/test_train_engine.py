"""Training building blocks without Ray: lr schedule, seeding, epoch plan, and DeepSpeed checkpoints.

The DeepSpeed tests run one process (gloo, world size 1) on a toy module with a frozen parameter
and a buffer, so the consolidation and save/restore paths of ZeRO 0-3 are exercised in seconds.
"""

import pytest
import torch
from torch import nn

from dino_platform.errors import ConfigError
from dino_platform.train.config import load_config
from dino_platform.train.engine import lr_factor, seed_step, set_epoch_lr


def test_step_decay_follows_lr_drop():
    optim = load_config({"data": {"train_uri": "x"}, "optim": {"lr_drop": 3}}).optim
    assert [lr_factor(optim, e) for e in range(7)] == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01])
    opt = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(1))], "lr": 1e-4},
                             {"params": [nn.Parameter(torch.zeros(1))], "lr": 1e-5}])
    set_epoch_lr(opt, [1e-4, 1e-5], optim, epoch=4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-5, 1e-6])


def test_seed_step_replays_exactly_and_differs_across_steps_and_ranks():
    def draw(seed, step, rank):
        seed_step(seed, step, rank)
        return torch.rand(4)

    assert torch.equal(draw(1, 5, 0), draw(1, 5, 0))
    assert not torch.equal(draw(1, 5, 0), draw(1, 6, 0))
    assert not torch.equal(draw(1, 5, 0), draw(1, 5, 1))


def test_total_loss_uses_only_weighted_terms():
    from dino_core.criterion import SetCriterion
    from dino_core.matcher import HungarianMatcher

    criterion = SetCriterion(91, HungarianMatcher(), {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0})
    losses = {"loss_ce": torch.tensor(2.0), "loss_bbox": torch.tensor(1.0), "cardinality_error": torch.tensor(9.0)}
    assert criterion.total_loss(losses).item() == 7.0


def test_epoch_plan_counts_whole_accumulations_and_rejects_tiny_datasets():
    from dino_platform.train.loop import plan_epochs

    cfg = load_config({"data": {"train_uri": "x"},
                       "scaling": {"num_workers": 2, "batch_size_per_worker": 2, "accumulation_steps": 3}})
    plan = plan_epochs(29, cfg)  # 14 per worker -> 7 micro-batches -> 2 whole accumulations
    assert (plan.micro_batches_per_epoch, plan.steps_per_epoch) == (6, 2)
    with pytest.raises(ConfigError, match="fewer than one optimizer step"):
        plan_epochs(11, cfg)


# ---------------------------------------------------------------------------------------------
# DeepSpeed, one process


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(6, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 3)
        self.register_buffer("running", torch.arange(3, dtype=torch.float32))

    def forward(self, x):
        return self.head(torch.relu(self.frozen(self.backbone(x)))) + self.running


# process_group: the session-wide gloo group of tests/conftest.py


def _engine(stage: int):
    import deepspeed

    from dino_platform.train.deepspeed_config import build_deepspeed_config
    from dino_platform.train.engine import skip_cpu_shm_comm_build

    torch.manual_seed(0)
    model = Toy()
    cfg = load_config({"data": {"train_uri": "x"}, "deepspeed": {"zero_stage": stage},
                       "scaling": {"num_workers": 1, "batch_size_per_worker": 4}})
    skip_cpu_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=build_deepspeed_config(cfg),
                                      dist_init_required=False)
    return engine


def _train(engine, steps: int, start: int = 0):
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
        engine.backward(((engine(x) - y) ** 2).mean())
        engine.step()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_checkpoint_round_trip_resumes_exactly_and_consolidates_every_stage(stage, process_group, tmp_path):
    from dino_platform.run_state import TrainState
    from dino_platform.train.checkpointing import consolidated_state_dict, restore_checkpoint, write_checkpoint

    reference = _engine(stage)
    _train(reference, 4)
    expected = consolidated_state_dict(reference)

    first = _engine(stage)
    _train(first, 2)
    state = consolidated_state_dict(first)
    assert list(state) == list(Toy().state_dict())  # the module's own keys, in its order
    assert all(v.dtype == torch.float32 for v in state.values())
    write_checkpoint(first, tmp_path, TrainState(step=2, epoch=1, world_size=1), state, {"model": {}})
    torch.manual_seed(0)
    untouched = Toy().frozen.weight  # frozen parameters are saved too, unchanged by training
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["frozen.weight"], untouched)

    resumed = _engine(stage)
    with pytest.raises(ConfigError, match="written by 1 workers"):  # checked before DeepSpeed loads anything
        restore_checkpoint(resumed, tmp_path, world_size=4)
    restored = restore_checkpoint(resumed, tmp_path, world_size=1)
    assert (restored.step, restored.epoch) == (2, 1)
    _train(resumed, 2, start=2)
    final = consolidated_state_dict(resumed)
    for name in expected:
        assert torch.equal(final[name], expected[name]), name
    # the consolidated weights are usable without DeepSpeed
    plain = Toy()
    plain.load_state_dict(final)
    x = torch.randn(2, 6)
    with torch.no_grad():
        if stage < 3:
            assert torch.allclose(plain(x), resumed.module(x))
