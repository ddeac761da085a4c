"""Sweeps: spec parsing errors (fast) and the smoke sweep end to end (slow: real Ray Tune + Train,
real SQLite MLflow, the registry gate; run twice, the second run restores the finished sweep)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dino_platform.errors import ConfigError
from dino_platform.sweep.spec import apply_values, load_sweep_spec, parse_search_space
from support import REPO


SPEC = REPO / "pipelines" / "sweep_coco_ft.yaml"


def minimal(**changes):
    raw = {
        "name": "s", "output_root": "/tmp/none",
        "train": {"data": {"train_uri": "/tmp/x", "eval_uri": "/tmp/y"}, "model": {"preset": "dino_tiny"}},
        "search_space": {"optim.lr": {"loguniform": [1e-5, 1e-3]}},
    }
    raw.update(copy.deepcopy(changes))
    return raw


def test_both_presets_of_the_shipped_spec_validate():
    full = load_sweep_spec(SPEC)
    smoke = load_sweep_spec(SPEC, preset="smoke")
    assert full.search_space["model.overrides.num_queries"].kind == "choice"
    assert smoke.budget.num_samples == 4 and smoke.scheduler.grace_period == 1
    assert "model.overrides.num_queries" not in smoke.search_space  # a preset's space replaces the whole space
    assert smoke.base_config().scaling.num_workers == 1


def test_search_space_domains_map_to_tune():
    space = parse_search_space({"optim.lr": {"loguniform": ["1e-5", 1e-3]},
                                "model.overrides.num_queries": {"randint": [50, 60]},
                                "model.overrides.dn_number": {"choice": [0, 50]}})
    assert space["optim.lr"].values == (1e-5, 1e-3)
    tune_randint = space["model.overrides.num_queries"].to_tune()
    samples = {tune_randint.sample() for _ in range(400)}
    assert samples == set(range(50, 61))  # both ends included


@pytest.mark.parametrize("space, message", [
    ({"optim.lrr": {"uniform": [0, 1]}}, "search_space.optim.lrr: no field 'lrr' in optim"),
    ({"optim": {"uniform": [0, 1]}}, "search_space.optim: a section"),
    ({"optim.lr.x": {"uniform": [0, 1]}}, "search_space.optim.lr.x: optim.lr is not a section"),
    ({"model.overrides.num_querys": {"choice": [1]}}, "search_space.model.overrides.num_querys: 'num_querys' is not a dino_core"),
    ({"optim.lr": {"logunifrom": [1e-5, 1e-3]}}, "search_space.optim.lr: expected one of"),
    ({"optim.lr": {"loguniform": [0, 1e-3]}}, "search_space.optim.lr: loguniform needs 0 < low < high"),
    ({"optim.lr": {"uniform": [1e-3, 1e-5]}}, "search_space.optim.lr: uniform needs low < high"),
    ({"optim.lr": {"uniform": [1e-3]}}, "search_space.optim.lr: uniform needs [low, high]"),
    ({"optim.lr": {"choice": []}}, "search_space.optim.lr: choice needs a non-empty list"),
    ({"optim.epochs": {"randint": [1.5, 3]}}, "search_space.optim.epochs: randint needs integer bounds"),
    ({"optim.epochs": {"uniform": [1, 3]}}, "search_space.optim.epochs: value 1.0 gives an invalid training config (optim.epochs: expected an integer"),
    ({"optim.weight_decay": {"uniform": [-1, 1]}}, "search_space.optim.weight_decay: value -1.0"),
    ({"model.overrides.dn_number": {"choice": [-5, 10]}}, "search_space.model.overrides.dn_number: value -5"),
    ({"run.name": {"choice": ["a"]}}, "search_space.run.name: set by the sweep"),
    ({}, "search_space: required"),
])
def test_search_space_errors_name_the_field(space, message):
    with pytest.raises(ConfigError) as info:
        load_sweep_spec(minimal(search_space=space))
    assert message in str(info.value)


@pytest.mark.parametrize("changes, message", [
    ({"budget": {"num_samples": 0}}, "budget.num_samples: 0 must be >= 1"),
    ({"budget": {"max_concurent": 2}}, "did you mean budget.max_concurrent?"),
    ({"scheduler": {"kind": "hyperband"}}, "scheduler.kind: 'hyperband' is not allowed; choose one of asha, pbt, fifo"),
    ({"scheduler": {"reduction_factor": 1}}, "scheduler.reduction_factor: 1 must be >= 2"),
    ({"train": {"data": {"train_uri": "/tmp/x"}}}, "scheduler.metric: eval/AP needs evaluation during training"),
    ({"train": {"data": {"train_uri": "/tmp/x", "eval_uri": "/y"}, "optim": {"lr": -1}}}, "train: optim.lr: -1.0 must be > 0"),
    ({"tracking": {"url": "x"}}, "tracking.url: unknown"),
    ({"schedular": {}}, "unknown field schedular"),
])
def test_spec_errors_name_the_field(changes, message):
    with pytest.raises(ConfigError) as info:
        load_sweep_spec(minimal(**changes))
    assert message in str(info.value)


def test_unknown_preset_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="--preset fast: no such preset; available: smoke"):
        load_sweep_spec(SPEC, preset="fast")
    spec = load_sweep_spec(SPEC, preset="smoke", overrides=["budget.num_samples=6"])
    assert spec.budget.num_samples == 6


def test_apply_values_sets_nested_fields_without_touching_the_base():
    base = {"optim": {"lr": 1.0}, "model": {"preset": "dino_tiny"}}
    out = apply_values(base, {"optim.lr": 2.0, "model.overrides.dn_number": 5})
    assert out == {"optim": {"lr": 2.0}, "model": {"preset": "dino_tiny", "overrides": {"dn_number": 5}}}
    assert base == {"optim": {"lr": 1.0}, "model": {"preset": "dino_tiny"}}


# ---------------------------------------------------------------------------------------------
# the smoke sweep


SMOKE_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
             "MLFLOW_TRACKING_URI": ""}


def _smoke_command(root: Path, *overrides: str) -> list:
    cmd = [sys.executable, str(REPO / "pipelines" / "sweep_coco_ft.py"), "--preset", "smoke",
           "--set", f"output_root={root}", "--set", f"train.data.train_uri={root}/data/train",
           "--set", f"train.data.eval_uri={root}/data/val"]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def _run_smoke(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_smoke_command(root, *overrides), cwd=REPO, env={**os.environ, **SMOKE_ENV},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_smoke_sweep_asha_nested_runs_and_champion_gate(tmp_path):
    from mlflow import MlflowClient

    started = time.monotonic()
    _run_smoke(tmp_path)
    first_wall = time.monotonic() - started
    sweep_dir = tmp_path / "sweep_coco_ft"
    first = json.loads((sweep_dir / "sweep_result.json").read_text())

    # 4 trials; ASHA (grace 1 epoch, reduction 2, max 3 epochs) stopped at least one before the last epoch
    trials = first["trials"]
    assert len(trials) == 4
    epochs = sorted(t["epochs"] for t in trials)
    assert epochs[-1] == 3 and epochs[0] < 3, epochs
    assert all(t["status"] == "TERMINATED" for t in trials)
    assert first["best"]["checkpoint"] and Path(first["best"]["checkpoint"]).is_dir()
    scored = [t["checkpoint_metric"] for t in trials if t["checkpoint_metric"] is not None]
    assert first["best"]["checkpoint_metric"] == min(scored)  # the smoke preset schedules on loss (min)

    # MLflow: 4 training runs and the best checkpoint's evaluation nested under the sweep's run
    uri = first["tracking_uri"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep_coco_ft_smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = first["parent_run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    trial_runs = [r for r in children if "dino.sweep_trial" in r.data.tags and r.info.run_name.startswith("trial_")]
    assert len(trial_runs) == 4
    assert all("loss" in r.data.metrics for r in trial_runs)
    # a trial ASHA stops at its first rung may stop on the loss report before its first evaluation
    evaluated = {t["trial_id"] for t in trials if t["checkpoint"]}
    assert all("eval/AP" in r.data.metrics for r in trial_runs if r.data.tags["dino.sweep_trial"] in evaluated)
    assert {r.data.params["optim.lr"] for r in trial_runs} == {str(t["config"]["optim.lr"]) for t in trials}
    assert client.get_run(parent).info.status == "FINISHED"

    # no champion before: the best trial's version becomes @champion
    reg = first["registration"]
    assert reg["promoted"] and reg["champion_version"] == reg["version"]
    name = reg["name"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(reg["version"])
    best_run = [r for r in trial_runs if r.data.tags["dino.sweep_trial"] == first["best"]["trial_id"]]
    assert len(best_run) == 1
    # the gate's evaluation of the best checkpoint agrees with that trial's own last evaluation (same weights, data)
    assert abs(first["evaluation"]["AP"] - best_run[0].data.metrics["eval/AP"]) < 1e-6

    # the same command again: Tune restores the finished sweep (no trial re-runs), the gate re-evaluates
    # the same best checkpoint; an equal AP does not beat the champion, so the alias stays
    started = time.monotonic()
    second_run = _run_smoke(tmp_path)
    second_wall = time.monotonic() - started
    second = json.loads((sweep_dir / "sweep_result.json").read_text())
    assert second["restored"] and "(restored)" in second_run.stdout
    assert second["parent_run_id"] == parent
    assert {t["trial_id"]: t["epochs"] for t in second["trials"]} == {t["trial_id"]: t["epochs"] for t in trials}
    reg2 = second["registration"]
    assert reg2["version"] != reg["version"] and not reg2["promoted"]
    assert "does not beat" in reg2["decision"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(reg["version"])
    runs_after = client.search_runs([experiment.experiment_id], max_results=100)
    assert len([r for r in runs_after if r.data.tags.get("mlflow.parentRunId") == parent
                and r.info.run_name.startswith("trial_")]) == 4
    print(f"smoke sweep: {first_wall:.0f} s; restored re-run with gate: {second_wall:.0f} s; epochs {epochs}")


# ---------------------------------------------------------------------------------------------
# PBT: spec checks and which training run a (re)started trial continues


def test_pbt_mutations_default_to_the_mutable_searched_fields():
    spec = load_sweep_spec(SPEC, preset="smoke", overrides=["scheduler.kind=pbt", "budget.max_concurrent=2"])
    mutations = spec.pbt_mutations()
    assert sorted(mutations) == ["model.overrides.dn_box_noise_scale", "model.overrides.dn_number",
                                 "optim.lr", "optim.weight_decay"]
    assert mutations["model.overrides.dn_number"] == [0, 20]  # a choice mutates to a neighbouring value
    full = load_sweep_spec(SPEC, overrides=["scheduler.kind=pbt"])
    assert "model.overrides.num_queries" not in full.pbt_mutations()  # it changes tgt_embed's shape


@pytest.mark.parametrize("scheduler, budget, message", [
    ({"kind": "pbt", "mutate": ["model.overrides.num_queries"]}, {"max_concurrent": 2},
     "scheduler.mutate: model.overrides.num_queries cannot change while a trial continues another's checkpoint"),
    ({"kind": "pbt", "mutate": ["optim.lr_backbone"]}, {"max_concurrent": 2},
     "scheduler.mutate: optim.lr_backbone is not in search_space"),
    ({"kind": "pbt"}, {"max_concurrent": 1}, "budget.max_concurrent: 1; PBT needs a population"),
    ({"kind": "pbt", "quantile_fraction": 0.7}, {"max_concurrent": 2}, "scheduler.quantile_fraction: 0.7"),
    ({"kind": "pbt", "perturbation_interval": 0}, {"max_concurrent": 2}, "scheduler.perturbation_interval: 0"),
])
def test_pbt_errors_name_the_field(scheduler, budget, message):
    space = {"optim.lr": {"loguniform": [1e-5, 1e-3]}, "model.overrides.num_queries": {"choice": [100, 300]}}
    with pytest.raises(ConfigError) as info:
        load_sweep_spec(minimal(search_space=space, scheduler=scheduler, budget=budget))
    assert message in str(info.value)


def test_pbt_needs_a_mutable_field():
    with pytest.raises(ConfigError, match="PBT needs at least one mutable field"):
        load_sweep_spec(minimal(search_space={"model.overrides.num_queries": {"choice": [100, 300]}},
                                scheduler={"kind": "pbt"}, budget={"max_concurrent": 2}))


def test_trial_run_continues_its_own_run_or_starts_a_new_one_from_a_clone():
    from dino_platform.sweep.tuner import trial_run

    assert trial_run("a_00001", None) == ("trial_a_00001", None)
    own = {"uri": "/s/trials/trial_a_00001/checkpoint_step0000004", "trial_id": "a_00001",
           "run_name": "trial_a_00001", "step": 4, "epoch": 1}
    assert trial_run("a_00001", own) == ("trial_a_00001", None)  # Ray Train resumes the run itself
    donor = {**own, "trial_id": "a_00000", "run_name": "trial_a_00000",
             "uri": "/s/trials/trial_a_00000/checkpoint_step0000004"}
    assert trial_run("a_00001", donor) == ("trial_a_00001_from_a_00000_step0000004", donor["uri"])
    # a clone that was itself interrupted continues its own (cloned) run
    cloned = {**own, "run_name": "trial_a_00001_from_a_00000_step0000004"}
    assert trial_run("a_00001", cloned) == ("trial_a_00001_from_a_00000_step0000004", None)


def test_start_from_must_be_a_training_checkpoint(tmp_path):
    from dino_platform.run_state import read_train_state
    from dino_platform.storage import StorageError

    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(StorageError, match="not a dino training checkpoint \\(no train_state.json\\)"):
        read_train_state(str(tmp_path))
    (tmp_path / "train_state.json").write_text(json.dumps({"step": 8, "epoch": 2, "batches_in_epoch": 0,
                                                            "seed": 1, "world_size": 1}))
    start = read_train_state(str(tmp_path))
    assert (start.step, start.epoch) == (8, 2)


@pytest.mark.slow
def test_smoke_sweep_with_pbt_clones_a_checkpoint_into_a_new_run(tmp_path):
    """Synchronous PBT on the smoke preset, a population of 2, 2 epochs, perturbation after epoch 1:
    the worse trial continues the better one's checkpoint as a new training run (nested in MLflow,
    tagged with its origin) from the step that checkpoint was written at. (3 epochs, i.e. a second
    perturbation, cost 511 s in `make test` against the same assertions.)"""
    from mlflow import MlflowClient

    started = time.monotonic()
    _run_smoke(tmp_path, "scheduler.kind=pbt", "scheduler.synch=true", "scheduler.quantile_fraction=0.5",
               "budget.num_samples=2", "budget.max_concurrent=2", "train.optim.epochs=2",
               "register.model_name=dino-coco-sweep-pbt")
    wall = time.monotonic() - started
    result = json.loads((tmp_path / "sweep_coco_ft" / "sweep_result.json").read_text())
    assert len(result["trials"]) == 2 and all(t["status"] == "TERMINATED" for t in result["trials"])
    client = MlflowClient(result["tracking_uri"])
    experiment = client.get_experiment_by_name("sweep_coco_ft_smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result["parent_run_id"]]
    clones = [r for r in nested if "dino.cloned_from_trial" in r.data.tags]
    assert clones, "PBT exploited no checkpoint: " + json.dumps([t["epochs"] for t in result["trials"]])
    trial_dirs = tmp_path / "sweep_coco_ft" / "trials"
    for run in clones:
        origin = run.data.tags["dino.started_from"]
        assert Path(origin).is_dir() and run.data.tags["dino.cloned_from_trial"] != run.data.tags["dino.sweep_trial"]
        origin_step = json.loads((Path(origin) / "train_state.json").read_text())["step"]
        assert run.info.run_name.startswith(f"trial_{run.data.tags['dino.sweep_trial']}_from_")
        # the clone's checkpoints continue the origin's step count in its own run directory
        steps = [json.loads((d / "train_state.json").read_text())["step"]
                 for d in (trial_dirs / run.info.run_name).glob("checkpoint_step*")]
        assert steps and min(steps) > origin_step, (origin_step, steps)
        assert client.get_metric_history(run.info.run_id, "resumed_from_step")[0].value == origin_step
    assert result["registration"]["promoted"]
    print(f"pbt smoke sweep: {wall:.0f} s; {len(clones)} cloned runs; epochs {[t['epochs'] for t in result['trials']]}")


@pytest.mark.slow
def test_interrupted_smoke_sweep_resumes_without_registering(tmp_path):
    """SIGINT while the second trial trains: Tune saves the experiment, the command exits 130 with
    nothing evaluated or registered; the same command restores it, the finished trial is not re-run
    and the interrupted trial's training continues from its last checkpoint (one MLflow run each)."""
    import signal

    from mlflow import MlflowClient

    from dino_platform.pipeline.stages.train import latest_checkpoint
    from dino_platform.storage import resolve

    # FIFO: no early stop can end the second trial before the interrupt lands
    budget = ("budget.num_samples=2", "scheduler.kind=fifo", "train.optim.epochs=2",
              "register.model_name=dino-coco-sweep-resume")
    trials_dir = tmp_path / "sweep_coco_ft" / "trials"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(_smoke_command(tmp_path, *budget), cwd=REPO, env={**os.environ, **SMOKE_ENV},
                             stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 900

    def second_trial_checkpoint():
        runs = list(trials_dir.glob("trial_*_00001"))
        return latest_checkpoint(resolve(str(runs[0]))) if runs else None

    while second_trial_checkpoint() is None:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
        assert time.time() < deadline, "the second trial wrote no checkpoint in 900 s"
        time.sleep(0.5)
    interrupted_at = second_trial_checkpoint()[1]
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=300) == 130, (tmp_path / "first.log").read_text()[-4000:]
    assert "nothing was evaluated or registered" in (tmp_path / "first.log").read_text()
    assert not (tmp_path / "sweep_coco_ft" / "sweep_result.json").exists()
    first_trial_checkpoints = sorted(p.name for p in trials_dir.glob("trial_*_00000/checkpoint_step*"))

    done = _run_smoke(tmp_path, *budget)
    result = json.loads((tmp_path / "sweep_coco_ft" / "sweep_result.json").read_text())
    assert result["restored"] and len(result["trials"]) == 2
    assert all(t["status"] == "TERMINATED" for t in result["trials"])
    assert sorted(p.name for p in trials_dir.glob("trial_*_00000/checkpoint_step*")) == first_trial_checkpoints
    client = MlflowClient(result["tracking_uri"])
    experiment = client.get_experiment_by_name("sweep_coco_ft_smoke")
    runs = [r for r in client.search_runs([experiment.experiment_id], max_results=100)
            if r.data.tags.get("mlflow.parentRunId") == result["parent_run_id"] and r.info.run_name.startswith("trial_")]
    assert len(runs) == 2
    second = [r for r in runs if r.data.tags["dino.sweep_trial"].endswith("_00001")]
    resumed = client.get_metric_history(second[0].info.run_id, "resumed_from_step")
    assert resumed and resumed[0].value >= interrupted_at, (interrupted_at, resumed)
    assert client.get_run(result["parent_run_id"]).info.status == "FINISHED"
    assert result["registration"]["promoted"] and "(restored)" in done.stdout
