"""The training loop's pieces without a cluster: the workers' inputs, the epoch plan, the step and
epoch accounting, the evaluation and checkpoint cadence, the progress sums, the consumed-image log;
and the one place the platform starts Ray."""
from __future__ import annotations

import dataclasses
import os
import json
import pickle
from pathlib import Path

import pytest
import torch

from dino_platform.errors import ConfigError
from dino_platform.storage import resolve
from dino_platform.run_state import TrainState
from dino_platform.train.config import load_config
from dino_platform.train.loop import (
    EpochPlan,
    WorkerInputs,
    _ConsumedImages,
    _Progress,
    count_micro_batch,
    due_after_step,
    end_epoch_if_complete,
    plan_epochs,
)
from support import REPO


def _cfg(**sections):
    return load_config({"data": {"train_uri": "x"}, **sections})


def _inputs(tmp_path, cfg, num_train_images=64, **fields) -> WorkerInputs:
    return WorkerInputs(cfg=cfg, num_train_images=num_train_images, run_location=resolve(str(tmp_path)),
                        session="s1", **fields)


# ---------------------------------------------------------------------------------------------
# the workers' inputs and the plan


def test_worker_inputs_survive_pickling_and_keep_the_ground_truth_out_of_their_repr(tmp_path):
    from dino_platform.tracking import TrackingTarget

    ground_truth = {"images": [{"id": 7, "file_name": "gt-7.jpg"}], "annotations": [], "categories": [{"id": 1}]}
    inputs = _inputs(tmp_path, _cfg(data={"train_uri": "x", "eval_uri": "y"}), ground_truth=ground_truth,
                     tracking=TrackingTarget("sqlite:///m.db", "run1"), image_log=str(tmp_path / "log"))
    back = pickle.loads(pickle.dumps(inputs))
    assert back == inputs and back.ground_truth == ground_truth
    assert back.run_location.child("a").uri == inputs.run_location.child("a").uri
    assert "gt-7.jpg" not in repr(inputs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        inputs.session = "other"


def test_worker_inputs_refuse_a_group_size_that_cannot_make_a_step(tmp_path):
    elastic = _cfg(scaling={"num_workers": [1, 4], "batch_size_per_worker": 2, "keep_total_batch": False})
    assert _inputs(tmp_path, elastic, num_train_images=8).plan(4).steps_per_epoch == 1
    with pytest.raises(ConfigError, match="data.train_uri: 7 training images are fewer than one optimizer step"):
        _inputs(tmp_path, elastic, num_train_images=7)  # 4 workers x batch 2 need 8


def test_worker_inputs_carry_the_ground_truth_exactly_with_an_eval_set(tmp_path):
    with pytest.raises(ValueError, match="ground_truth .* goes with data.eval_uri"):
        _inputs(tmp_path, _cfg(data={"train_uri": "x", "eval_uri": "y"}))
    with pytest.raises(ValueError, match="ground_truth .* goes with data.eval_uri"):
        _inputs(tmp_path, _cfg(), ground_truth={"images": []})


def test_plan_caps_the_run_at_max_steps_and_keeps_the_schedule_across_sizes():
    cfg = _cfg(scaling={"num_workers": 2, "batch_size_per_worker": 2, "accumulation_steps": 2},
               optim={"epochs": 3})
    assert plan_epochs(40, cfg) == EpochPlan(micro_batches_per_epoch=10, steps_per_epoch=5, total_steps=15)
    capped = _cfg(scaling={"num_workers": 2, "batch_size_per_worker": 2, "accumulation_steps": 2},
                  optim={"epochs": 3, "max_steps": 7})
    assert plan_epochs(40, capped).total_steps == 7
    elastic = _cfg(scaling={"num_workers": [1, 2], "batch_size_per_worker": 2, "accumulation_steps": 2},
                   optim={"epochs": 2})  # total batch 8 at every size
    plans = {w: plan_epochs(64, elastic.at_world_size(w)) for w in (1, 2)}
    assert {p.steps_per_epoch for p in plans.values()} == {8} and {p.total_steps for p in plans.values()} == {16}


# ---------------------------------------------------------------------------------------------
# step and epoch accounting


def test_micro_batches_count_into_steps_and_epochs():
    plan = EpochPlan(micro_batches_per_epoch=4, steps_per_epoch=2, total_steps=4)
    state = TrainState(epoch_redealt=True)
    steps_at, epochs_at = [], []
    for micro_batch in range(1, 9):
        if count_micro_batch(state, accumulation_steps=2):
            steps_at.append(micro_batch)
            if end_epoch_if_complete(state, plan):
                epochs_at.append(micro_batch)
    assert steps_at == [2, 4, 6, 8] and epochs_at == [4, 8]
    assert (state.step, state.epoch, state.batches_in_epoch, state.steps_in_epoch) == (4, 2, 0, 0)
    assert not state.epoch_redealt  # a new epoch follows the plain split again


def test_a_resumed_state_counts_on_from_its_position():
    plan = EpochPlan(micro_batches_per_epoch=6, steps_per_epoch=3, total_steps=9)
    state = TrainState(step=4, epoch=1, batches_in_epoch=2, steps_in_epoch=1)
    assert not count_micro_batch(state, 2) and count_micro_batch(state, 2)
    assert not end_epoch_if_complete(state, plan)
    assert (state.step, state.epoch, state.batches_in_epoch, state.steps_in_epoch) == (5, 1, 4, 2)


@pytest.mark.parametrize("step, epoch, end_of_epoch, finished, expected", [
    (3, 0, False, False, (False, True)),  # every 3 steps
    (4, 0, False, False, (False, False)),
    (4, 2, True, False, (True, True)),  # every 2 epochs: evaluate and checkpoint
    (5, 3, True, False, (False, False)),
    (7, 3, False, True, (True, True)),  # the last step does both
])
def test_evaluation_and_checkpoint_cadence(step, epoch, end_of_epoch, finished, expected):
    cfg = _cfg(data={"train_uri": "x", "eval_uri": "y"}, eval={"every_n_epochs": 2},
               checkpoint={"every_n_steps": 3, "every_n_epochs": 2})
    state = TrainState(step=step, epoch=epoch)
    assert due_after_step(cfg, state, end_of_epoch, finished) == expected
    no_eval = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_uri=None))
    assert due_after_step(no_eval, state, end_of_epoch, finished) == (False, expected[1])


# ---------------------------------------------------------------------------------------------
# progress and the consumed-image log


def test_progress_sums_loss_terms_and_splits_busy_from_data_wait(monkeypatch):
    from dino_platform.train import loop

    clock = iter([0.0, 1.0, 3.0, 4.0, 6.0])  # mark; arrival after 1 s, step done 2 s later; and again
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    progress = _Progress(world_size=2, batch_size=4)
    for loss in (1.0, 3.0):
        progress.batch_arrived()
        progress.add_micro_batch(torch.tensor(loss), {"loss_ce": torch.tensor(loss / 2), "cardinality_error": torch.tensor(9.0)})
    assert list(progress.sums) == ["loss", "loss_ce"]  # only the main terms
    assert {name: float(v) for name, v in progress.sums.items()} == {"loss": 4.0, "loss_ce": 2.0}
    assert progress.micro_batches == 2 and (progress.busy, progress.data_wait) == (6.0, 2.0)


def test_consumed_images_log_each_step_and_restart_each_epoch(tmp_path):
    consumed = _ConsumedImages(before=[1, 2], log_dir=str(tmp_path / "log"), rank=0, world_size=1)
    consumed.add([{"image_id": torch.tensor(3)}, {"image_id": 4}])
    consumed.step_done(TrainState(step=1, epoch=0))
    assert consumed.gather() == [1, 2, 3, 4]
    consumed.new_epoch()
    consumed.add([{"image_id": 5}])
    consumed.step_done(TrainState(step=2, epoch=1))
    assert consumed.gather() == [5]
    (log_file,) = Path(tmp_path / "log").iterdir()
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [(line["step"], line["epoch"], line["image_ids"]) for line in lines] == [(1, 0, [3, 4]), (2, 1, [5])]
    assert len({line["group"] for line in lines}) == 1


# ---------------------------------------------------------------------------------------------
# starting Ray


def test_ray_session_connect_is_the_only_place_the_platform_starts_ray():
    platform = REPO / "platform"
    starts = sorted(str(path.relative_to(platform)) for path in platform.rglob("*.py")
                    if "ray.init(" in path.read_text())
    assert starts == ["dino_platform/ray_session.py"]


@pytest.fixture
def ray_init_calls(monkeypatch):
    import ray

    from dino_platform import ray_session

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_session, "_remember", lambda url: calls[-1].update(remembered=url))
    # each call records its arguments and the driver's State API variable while Ray starts
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(
        {**kwargs, "driver_env": os.environ.get("RAY_API_SERVER_ADDRESS")}))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    return calls


def test_connect_starts_a_local_instance_with_its_state_api_named_to_its_job_only(ray_init_calls):
    from dino_platform.ray_session import connect

    assert connect(num_cpus=2, log_to_driver=False) == "a local Ray instance (2 CPUs)"
    (call,) = ray_init_calls
    assert call["address"] == "local" and call["num_cpus"] == 2 and call["include_dashboard"] is True
    url = f"http://127.0.0.1:{call['dashboard_port']}"
    assert call["runtime_env"] == {"env_vars": {"RAY_API_SERVER_ADDRESS": url}} and call["remembered"] == url
    # the driver's environment is as it was: a later `ray job submit` or child process is not sent to it
    assert call["driver_env"] is None and "RAY_API_SERVER_ADDRESS" not in os.environ
    # a runtime env of the caller's keeps its settings, its own values first
    connect(runtime_env={"pip": ["x"], "env_vars": {"A": "1", "RAY_API_SERVER_ADDRESS": "http://mine:1"}})
    assert ray_init_calls[1]["runtime_env"] == {"pip": ["x"], "env_vars": {"A": "1",
                                                                         "RAY_API_SERVER_ADDRESS": "http://mine:1"}}


def test_connect_joins_the_address_given_else_ray_address_without_local_settings(ray_init_calls, monkeypatch):
    from dino_platform.ray_session import connect

    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")  # named already: no lookup
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert connect(num_cpus=2) == "Ray cluster at 10.0.0.1:6379"
    assert connect("10.0.0.2:6379") == "Ray cluster at 10.0.0.2:6379"
    assert connect("local").startswith("a local Ray instance")
    assert [c["address"] for c in ray_init_calls] == ["10.0.0.1:6379", "10.0.0.2:6379", "local"]
    assert "num_cpus" not in ray_init_calls[0] and "include_dashboard" not in ray_init_calls[0]


def test_connect_keeps_a_running_instance(monkeypatch):
    import ray

    from dino_platform.ray_session import connect

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init called while connected"))
    assert connect() == "the Ray instance this process already uses"


def test_a_started_instance_names_its_state_api_to_its_tasks_and_actors_and_forgets_it_at_shutdown():
    """A real local instance, in a process of its own (this session may have one already)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent('''
        import os
        import ray
        from dino_platform.ray_session import connect, state_api_url

        connect(num_cpus=1, log_to_driver=False)
        url = state_api_url()
        assert url and "RAY_API_SERVER_ADDRESS" not in os.environ, (url, os.environ.get("RAY_API_SERVER_ADDRESS"))
        worker_env = ray.get(ray.remote(lambda: os.environ.get("RAY_API_SERVER_ADDRESS")).remote())
        assert worker_env == url, (worker_env, url)

        @ray.remote(num_cpus=0)
        class Probe:
            def env(self):
                return os.environ.get("RAY_API_SERVER_ADDRESS")

            def detached_child_env(self):  # as Ray Train's controller starts its PlacementGroupCleaner
                return ray.get(Probe.options(lifetime="detached").remote().env.remote())

        cleaner_env = ray.get(Probe.remote().detached_child_env.remote())
        assert cleaner_env == url, (cleaner_env, url)
        from ray.util.state import list_nodes
        assert len(list_nodes(address=url, timeout=30)) == 1  # this instance's State API answers there
        ray.shutdown()
        assert state_api_url() is None
        print("ok")
    ''')
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
