"""The headline command, for real: a Ray head started with ``ray start --head`` on loopback, the smoke
pipeline submitted with ``ray job submit --working-dir .`` and its relative output root, stopped
during fine-tuning, a file of the working dir edited, resubmitted (continues from the fine-tune's
last checkpoint, then evaluates, registers and predicts), and resubmitted once more (trains
nothing). The outputs live under ``$DINO_HOME``, not in Ray's per-upload copy of the working dir.
The registered version and its tags are read back from MLflow.

The head is this test's own: fresh ports, its own --temp-dir, stopped by signalling its
``ray start --block`` process (``ray stop`` would stop every Ray instance on the machine).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

import pytest
import yaml
from support import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

VENV_BIN = Path(sys.executable).parent
# the smoke preset cut to a few steps (the demo's full schedule is tested in test_demo_recipe.py),
# with a fine-tune checkpoint every 2 steps to stop in and resume from
ENTRY = ["python", "pipelines/o365_pretrain_coco_ft.py", "--preset", "smoke",
         "--set", "stages.pretrain.config.optim.max_steps=4", "--set", "stages.finetune.config.optim.max_steps=6",
         "--set", "stages.finetune.config.checkpoint={every_n_steps: 2, num_to_keep: 2}"]


def _free_ports(n: int):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _env():
    env = dict(os.environ)
    # The head runs without token auth (Ray 2.60 enables it by default and `ray job submit` then needs
    # RAY_AUTH_MODE=token and the token on the client); job entrypoints find the venv's python first.
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true",
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    for name in _FOREIGN:
        env.pop(name, None)
    return env


# a shell user's `ray job submit` has none of these; either would send the client to another cluster
_FOREIGN = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI")


@pytest.fixture(scope="module", autouse=True)
def _no_foreign_cluster():
    """This module's in-process job clients also talk only to the head started here."""
    with pytest.MonkeyPatch.context() as patch:
        for name in _FOREIGN:
            patch.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    gcs, dashboard, client, agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = _free_ports(9)
    temp_dir = f"/tmp/rayp_{uuid.uuid4().hex[:8]}"  # short: Ray's unix sockets live below it
    log = open(tmp_path_factory.mktemp("head") / "ray_start.log", "w")
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
         f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}", "--num-cpus=2",
         "--disable-usage-stats", f"--temp-dir={temp_dir}", "--include-dashboard=true"],
        env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_job_api(address, head)
        yield types.SimpleNamespace(address=address, temp_dir=Path(temp_dir))
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its own processes on SIGTERM
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job_api(address: str, head: subprocess.Popen) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 240
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:
            time.sleep(2)
    raise TimeoutError(f"the Ray job API at {address} did not come up in 240 s")


def _submit(address: str, working_dir: Path, output_root: str, dino_home: Path, commit: str) -> str:
    """``ray job submit --working-dir .`` of the smoke pipeline from ``working_dir``; returns the submission id."""
    runtime_env = yaml.safe_load((REPO / "clusters" / "job_runtime_env.yaml").read_text())
    runtime_env["excludes"] = [*runtime_env["excludes"], "/.git/", "/runs/", "/tests/fixtures/"]
    runtime_env["env_vars"] = {"DINO_GIT_COMMIT": commit, "RAY_USAGE_STATS_ENABLED": "0",
                               "MLFLOW_DISABLE_TELEMETRY": "true", "DINO_HOME": str(dino_home)}
    submission = f"pipeline-{uuid.uuid4().hex[:8]}"
    done = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--submission-id",
                           submission, "--no-wait", "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env),
                           "--", *ENTRY, "--set", f"output_root={output_root}"],
                          cwd=working_dir, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, \
        f"ray job submit failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return submission


def _working_dir_copies(ray_temp_dir: Path) -> list:
    """Ray's per-upload copies of the working dir (named by a hash of the uploaded files)."""
    found = ray_temp_dir.glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
    return sorted({p.resolve() for p in found if p.is_dir()})  # session_latest links to the session


def _wait(address: str, submission: str, timeout: float = 900) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(submission)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        time.sleep(3)
    raise TimeoutError(f"job {submission} still {status} after {timeout} s")


def _logs(address: str, submission: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address).get_job_logs(submission)


def _state(output_root: Path) -> dict:
    return json.loads((output_root / "pipeline_state.json").read_text())


def _resumable_finetune(output_root: Path) -> bool:
    from dino_platform.pipeline.stages.train import latest_checkpoint
    from dino_platform.storage import resolve

    return any(latest_checkpoint(resolve(str(d))) is not None for d in (output_root / "train").glob("finetune-*"))


def _checkpoints(output_root: Path) -> list:
    return sorted(str(p.relative_to(output_root)) for p in (output_root / "train").glob("*/checkpoint_step*"))


def test_submitted_pipeline_resumes_registers_and_skips(ray_head, tmp_path):
    from mlflow import MlflowClient

    from dino_platform.data.manifest import read_manifest
    from dino_platform.registry.models import git_commit

    # The user's checkout (pipelines/ is all the runtime env uploads) and a relative output root:
    # it must land under $DINO_HOME, where the next submit finds it, whatever the upload's hash.
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "pipelines", checkout / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    dino_home = tmp_path / "dino_home"
    relative_root = f"runs/e2e-{uuid.uuid4().hex[:6]}"
    output_root = dino_home / relative_root
    address = ray_head.address

    def submit() -> str:
        return _submit(address, checkout, relative_root, dino_home, commit)

    commit = git_commit(str(REPO))
    timings = {}

    # 1. submit; stop the job once fine-tuning has a checkpoint Ray Train resumes from. The checkpoint
    # directory is uploaded before Ray Train records it in checkpoint_manager_snapshot.json; a stop in
    # between leaves nothing to resume (a fast CI host hit that window), so wait for the snapshot.
    started = time.time()
    first = submit()
    deadline = time.time() + 900
    while not _resumable_finetune(output_root):
        from ray.job_submission import JobSubmissionClient

        status = JobSubmissionClient(address).get_job_status(first)
        assert str(status.value) in ("PENDING", "RUNNING"), f"job ended ({status}) before fine-tuning:\n" \
                                                            f"{_logs(address, first)[-6000:]}"
        assert time.time() < deadline, "fine-tuning wrote no checkpoint in 900 s"
        time.sleep(0.5)
    subprocess.run([str(VENV_BIN / "ray"), "job", "stop", "--address", address, first],
                   env=_env(), check=True, capture_output=True, timeout=120)
    assert _wait(address, first, timeout=180) == "STOPPED"
    timings["until stopped in fine-tuning"] = time.time() - started
    state = _state(output_root)
    assert state["stages"]["pretrain"]["status"] == "done"
    # SIGTERM from `ray job stop` reaches the driver as SystemExit (recorded) or kills it outright
    assert state["stages"]["finetune"]["status"] in ("interrupted", "running"), \
        f"the stop came after fine-tuning had finished: {state['stages']['finetune']}"

    # 2. edit a file of the working dir (a new upload, a new copy), resubmit: pretraining is skipped,
    # fine-tuning continues from its last checkpoint, the rest runs
    entry = checkout / "pipelines" / "o365_pretrain_coco_ft.py"
    entry.write_text(entry.read_text() + "\n# edited between two submits\n")
    started = time.time()
    second = submit()
    assert _wait(address, second) == "SUCCEEDED", _logs(address, second)[-8000:]
    timings["resumed run"] = time.time() - started
    run = _state(output_root)["runs"][-1]
    actions = {name: a["action"] for name, a in run["actions"].items()}
    assert actions == {"ingest": "skipped", "pretrain": "skipped", "finetune": "resumed", "evaluate": "ran",
                       "register": "ran", "predict": "ran"}, run
    assert run["actions"]["finetune"]["resumed_from_step"] > 0
    logs = _logs(address, second)
    assert "resumed at step" in logs and "stage pretrain: skipped" in logs
    assert f"results go to {output_root}" in logs
    assert "Failed to query Ray Train Controller" not in logs
    copies = _working_dir_copies(ray_head.temp_dir)
    assert len(copies) >= 2, copies  # the edit gave the second submit a copy of its own
    assert not [c for c in copies if (c / "runs").exists()], "outputs landed in Ray's working-dir copy"

    # the registered version, its tags and the alias, read back from the job's MLflow store
    state = _state(output_root)
    tracking = f"sqlite:///{output_root / 'mlflow.db'}"
    client = MlflowClient(tracking, registry_uri=tracking)
    version = client.get_model_version("dino-coco", "1")
    tags = version.tags
    evaluation = state["stages"]["evaluate"]["outputs"]
    assert float(tags["AP"]) == pytest.approx(evaluation["metrics"]["AP"], abs=1e-6)
    assert float(tags["AP50"]) == pytest.approx(evaluation["metrics"]["AP50"], abs=1e-6)
    for dataset in ("o365_train", "coco_train", "coco_val"):
        assert tags[f"data_digest.{dataset}"] == read_manifest(str(output_root / "shards" / dataset)).digest
    for stage in ("pretrain", "finetune"):
        parent = client.get_run(tags[f"parent_run.{stage}"])
        assert parent.info.run_name.startswith(f"{stage}-")
    assert len(tags["config_hash"]) == 64 and tags["git_commit"] == commit
    assert tags["champion_decision"].startswith("version 1 becomes @champion")
    assert str(client.get_model_version_by_alias("dino-coco", "champion").version) == "1"
    assert version.run_id == evaluation["run_id"]
    # fine-tuning is one MLflow run across the stop, and it records where it resumed
    finetune_run = state["stages"]["finetune"]["outputs"]["run_id"]
    assert finetune_run == tags["parent_run.finetune"]
    resumed = [m.value for m in client.get_metric_history(finetune_run, "resumed_from_step")]
    assert resumed and resumed[-1] == run["actions"]["finetune"]["resumed_from_step"]
    pngs = state["stages"]["predict"]["outputs"]["pngs"]
    assert pngs and all(Path(p).is_file() and Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    # 3. resubmit the finished pipeline: nothing is trained, evaluated or registered again
    before = _checkpoints(output_root)
    started = time.time()
    third = submit()
    assert _wait(address, third) == "SUCCEEDED", _logs(address, third)[-8000:]
    timings["re-run of the finished pipeline"] = time.time() - started
    run = _state(output_root)["runs"][-1]
    assert {a["action"] for a in run["actions"].values()} == {"skipped"}, run
    assert _checkpoints(output_root) == before
    assert "run finetune" not in _logs(address, third)  # the trainer's start line never appears
    assert len(client.search_model_versions("name = 'dino-coco'")) == 1
    print("e2e timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
