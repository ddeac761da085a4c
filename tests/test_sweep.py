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

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "pipelines" / "sweep_coco_ft.yaml"


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
    ({"scheduler": {"kind": "hyperband"}}, "scheduler.kind: 'hyperband' is not allowed; choose one of asha, fifo"),
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
    with pytest.raises(ConfigError, match="preset 'fast' is not defined; available: smoke"):
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


def _run_smoke(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": ""}
    cmd = [sys.executable, str(ROOT / "pipelines" / "sweep_coco_ft.py"), "--preset", "smoke",
           "--set", f"output_root={root}", "--set", f"train.data.train_uri={root}/data/train",
           "--set", f"train.data.eval_uri={root}/data/val"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DINO_RUN_SWEEP_E2E") != "1",
                    reason="known issue (issue 7, open): the smoke sweep stalled after two trials on a shared host "
                           "and has not passed end to end yet; set DINO_RUN_SWEEP_E2E=1 to run it")
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
    assert client.get_model_version_by_alias(name, "champion").version == reg["version"]
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
    assert [t["epochs"] for t in second["trials"]] == [t["epochs"] for t in trials]
    reg2 = second["registration"]
    assert reg2["version"] != reg["version"] and not reg2["promoted"]
    assert "does not beat" in reg2["decision"]
    assert client.get_model_version_by_alias(name, "champion").version == reg["version"]
    runs_after = client.search_runs([experiment.experiment_id], max_results=100)
    assert len([r for r in runs_after if r.data.tags.get("mlflow.parentRunId") == parent
                and r.info.run_name.startswith("trial_")]) == 4
    print(f"smoke sweep: {first_wall:.0f} s; restored re-run with gate: {second_wall:.0f} s; epochs {epochs}")
