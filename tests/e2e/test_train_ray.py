"""Acceptance tests of training on Ray Train + DeepSpeed: real local Ray, real S3 (moto), real MLflow.

One uninterrupted 2-worker ZeRO-2 job (synthetic COCO-like shards on the S3 test endpoint,
checkpoints to S3) is the reference; a stopped-and-resumed job and a job with a killed worker
must end with bit-identical weights. Evaluation of its final checkpoint must not depend on the
number of workers or the evaluation batch size.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

TRANSFORM = {"scale": 0.15}  # short side 96 px: the official recipe scaled down for CPU


@pytest.fixture(scope="module")
def s3_env(_moto_server):
    """AWS_* pointing at the moto server for the whole module (the per-test fixture resets moto)."""
    from support.s3 import S3_TEST_ACCESS_KEY, S3_TEST_SECRET_KEY

    patch = pytest.MonkeyPatch()
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        patch.delenv(name)
    for name, value in {"AWS_ENDPOINT_URL": _moto_server, "AWS_ACCESS_KEY_ID": S3_TEST_ACCESS_KEY,
                        "AWS_SECRET_ACCESS_KEY": S3_TEST_SECRET_KEY, "AWS_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
                        "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
        patch.setenv(name, value)
    yield _moto_server
    patch.undo()


@pytest.fixture(scope="module")
def shards(s3_env, tmp_path_factory):
    """Synthetic COCO-like train (8 images) and val (4 images) shards in a bucket on the test endpoint."""
    from support.s3 import create_bucket
    from support.shards import synthetic_shards

    bucket = create_bucket(s3_env, f"train-{uuid.uuid4().hex[:8]}")
    raw = tmp_path_factory.mktemp("raw")
    out = {split: synthetic_shards(raw / split, images, seed, out_uri=f"{bucket}/shards/{split}")
           for split, images, seed in (("train", 8, 1), ("val", 4, 2))}
    out["bucket"] = bucket
    return out


def job(shards, storage: str, name: str, evaluate: bool = True, **sections):
    from dino_platform.train.config import load_config

    raw = {
        "data": {"train_uri": shards["train"], "eval_uri": shards["val"] if evaluate else None, "transform": TRANSFORM},
        "model": {"preset": "dino_tiny", "num_classes": 91},
        "optim": {"epochs": 2, "lr_drop": 1, "lr_drop_factor": 0.5, "lr": 2e-4},
        "scaling": {"num_workers": 2, "batch_size_per_worker": 2},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "eval": {"batch_size": 2, "num_logged_images": 2},
        "checkpoint": {"every_n_epochs": 1, "num_to_keep": None},
        "run": {"name": name, "storage_path": storage, "seed": 7},
        "tracking": {"log_every_n_steps": 1, "tracking_uri": None},
    }
    for section, values in sections.items():
        raw[section].update(values)
    return load_config(raw)


@pytest.fixture(scope="module")
def reference(shards, ray_local, tmp_path_factory, monkeypatch_module):
    """The uninterrupted job: data and checkpoints on S3, MLflow in a local SQLite file."""
    from dino_platform.train.trainer import run_training

    tracking_dir = tmp_path_factory.mktemp("mlflow")
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracking_dir}/mlflow.db")
    started = time.perf_counter()
    outcome = run_training(job(shards, f"{shards['bucket']}/runs", "reference"))
    print(f"reference job: {time.perf_counter() - started:.0f} s")
    return outcome


@pytest.fixture(scope="module")
def monkeypatch_module():
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


def _final_weights(checkpoint) -> dict:
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / "model.pt", map_location="cpu", weights_only=True)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _history(tracking, name):
    from mlflow import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(tracking.tracking_uri).get_metric_history(tracking.run_id, name)]


def test_two_worker_zero2_job_trains_checkpoints_evaluates_and_logs(reference, shards):
    from mlflow import MlflowClient

    from dino_platform.storage import resolve

    assert reference.error is None and reference.metrics["step"] == 4
    losses = [v for _, v in sorted(_history(reference.tracking, "loss"))]
    assert len(losses) == 4 and sum(losses[2:]) < sum(losses[:2]), losses  # epoch 2 below epoch 1, same images
    files = resolve(reference.run_dir).list_files()
    for step in (2, 4):  # one checkpoint per epoch, on S3, each with the resume state and model.pt
        for name in ("model.pt", "train_state.json", "train_config.json", "deepspeed/latest"):
            assert f"checkpoint_step{step:07d}/{name}" in files
    assert any(f.startswith("checkpoint_step0000004/deepspeed/state/zero_pp_rank_1") for f in files)

    client = MlflowClient(reference.tracking.tracking_uri)
    run = client.get_run(reference.tracking.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["deepspeed.zero_stage"] == "2" and run.data.params["optim.lr"] == "0.0002"
    assert "test-secret" not in str(run.data.params)
    assert {"eval/AP", "eval/AP50", "lr", "steps_per_s", "images_per_s", "loss_ce"} <= set(run.data.metrics)
    assert [s for s, _ in _history(reference.tracking, "eval/AP")] == [2, 4]
    assert [v for _, v in _history(reference.tracking, "lr")] == pytest.approx([2e-4, 2e-4, 1e-4, 1e-4])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval/step_0000004")}
    assert "eval/step_0000004/coco_eval.json" in artifacts
    assert sum(a.endswith(".png") for a in artifacts) == 2
    assert {a.path for a in client.list_artifacts(run.info.run_id, "curves")} == {"curves/loss.png", "curves/ap.png"}


def test_consolidated_checkpoint_matches_deepspeed_and_reproduces_outputs(reference, shards):
    import dino_core
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from mlflow import MlflowClient

    from dino_platform.data.streaming import build_eval_dataset, collate
    from dino_platform.evaluation.inference import predict_batch

    with reference.checkpoint.as_directory() as directory:
        ours = torch.load(Path(directory) / "model.pt", map_location="cpu", weights_only=True)
        offline = get_fp32_state_dict_from_zero_checkpoint(str(Path(directory) / "deepspeed"), tag="state")
    for name, value in offline.items():  # DeepSpeed's own offline consolidation of the same state
        assert torch.equal(ours[name], value.float()), name

    model, _, postprocessor = dino_core.build_model("dino_tiny", num_classes=91)
    report = dino_core.load_official_state_dict(model, ours, strict=True)
    assert not report.reinitialized
    model.eval()
    rows = list(build_eval_dataset(shards["val"], TRANSFORM).iter_rows())
    images, mask, targets = collate(rows)
    fresh = {p.image_id: p for p in predict_batch(model, postprocessor, images, mask, targets)}

    client = MlflowClient(reference.tracking.tracking_uri)
    logged = client.download_artifacts(reference.tracking.run_id, "eval/step_0000004/coco_eval.json")
    detections = json.loads(Path(logged).read_text())["detections"]  # canonical order: score desc
    assert {d["image_id"] for d in detections} == set(fresh)
    for image_id, prediction in fresh.items():  # what the workers predicted during training
        mine = [d for d in detections if d["image_id"] == image_id]
        assert len(mine) == len(prediction.scores)
        np.testing.assert_allclose([d["score"] for d in mine], prediction.scores, atol=1e-6)
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)]
        np.testing.assert_allclose(boxes, prediction.boxes, atol=1e-3)


def test_stopped_and_resumed_job_ends_with_the_same_weights(reference, shards, tmp_path):
    from dino_platform.train.trainer import run_training

    storage = str(tmp_path / "runs")
    first = run_training(job(shards, storage, "resumed", evaluate=False, optim={"max_steps": 2}))
    assert first.metrics["step"] == 2
    second = run_training(job(shards, storage, "resumed", evaluate=False))
    assert second.metrics["step"] == 4
    assert _history(second.tracking, "resumed_from_step") == [(2, 2.0)]
    assert second.tracking.run_id == first.tracking.run_id  # one MLflow run per job
    _assert_same_weights(_final_weights(second.checkpoint), _final_weights(reference.checkpoint))


def test_killed_worker_restarts_from_the_last_checkpoint(reference, shards, tmp_path):
    """SIGKILL one training worker after the first checkpoint; FailureConfig restarts the group."""
    import psutil
    import ray

    from dino_platform.train.trainer import run_training

    storage = tmp_path / "runs"
    killed = []
    # only this test session's workers: descendants of the raylet ray_local started
    raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)

    def registered(name: str) -> bool:  # Ray Train resumes only from checkpoints every rank reported
        snapshot = storage / "faulty" / "checkpoint_manager_snapshot.json"
        return snapshot.exists() and name in snapshot.read_text()

    def kill_after_first_checkpoint():
        deadline = time.time() + 600
        while time.time() < deadline and not registered("checkpoint_step0000002"):
            time.sleep(0.2)
        workers = [p for p in raylet.children(recursive=True) if "RayTrainWorker" in _command_line(p)]
        if workers:
            victim = max(workers, key=lambda p: p.pid)
            victim.send_signal(signal.SIGKILL)
            killed.append(victim.pid)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    outcome = run_training(job(shards, str(storage), "faulty", evaluate=False, run={"max_failures": 1, "seed": 7}))
    killer.join(timeout=5)
    assert killed, "no worker was killed"
    assert outcome.metrics["step"] == 4
    assert (2, 2.0) in _history(outcome.tracking, "resumed_from_step")  # restarted from step 2, not 0
    _assert_same_weights(_final_weights(outcome.checkpoint), _final_weights(reference.checkpoint))


def _command_line(process) -> str:
    """A process's command line, or "" for one that exited meanwhile (zombies raise in psutil)."""
    import psutil

    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def test_evaluation_does_not_depend_on_workers_or_batch_size(reference, shards):
    from mlflow import MlflowClient

    from dino_platform.evaluation.coco_eval import EvalConfig
    from dino_platform.evaluation.runner import run_evaluation

    with reference.checkpoint.as_directory() as directory:
        checkpoint = str(directory)
        results = {(w, b): run_evaluation(checkpoint, shards["val"], EvalConfig(batch_size=b), num_workers=w)
                   for w, b in ((1, 1), (2, 1), (2, 4))}
    baseline = results[(1, 1)]
    assert baseline["num_images"] == 4
    for key, result in results.items():
        assert result["stats"] == baseline["stats"], key
        assert result["per_class"] == baseline["per_class"], key
        assert result["detections"] == baseline["detections"], key
    in_training = MlflowClient(reference.tracking.tracking_uri).get_run(reference.tracking.run_id).data.metrics
    assert in_training["eval/AP"] == baseline["stats"]["AP"]  # 2 workers, batch 2, during training


def test_dino_eval_equals_pycocotools_on_every_num_select_detection(reference, shards):
    """The official DINO protocol: all num_select detections per image straight into pycocotools."""
    import dino_core
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from dino_platform.data.manifest import read_ground_truth
    from dino_platform.data.streaming import build_eval_dataset, collate
    from dino_platform.evaluation.coco_eval import STAT_NAMES
    from dino_platform.evaluation.inference import predict_batch
    from dino_platform.evaluation.runner import run_evaluation

    with reference.checkpoint.as_directory() as directory:
        result = run_evaluation(str(directory), shards["val"])
        state = torch.load(Path(directory) / "model.pt", map_location="cpu", weights_only=True)
    model, _, postprocessor = dino_core.build_model("dino_tiny", num_classes=91)
    dino_core.load_official_state_dict(model, state, strict=True)
    model.eval()
    images, mask, targets = collate(list(build_eval_dataset(shards["val"], TRANSFORM).iter_rows()))
    predictions = predict_batch(model, postprocessor, images, mask, targets)
    assert all(len(p.scores) == postprocessor.num_select for p in predictions)
    assert result["protocol"]["num_select"] == postprocessor.num_select
    assert result["protocol"]["detections_per_image"] is None and result["num_detections"] == 4 * postprocessor.num_select

    gt = COCO()
    gt.dataset = read_ground_truth(shards["val"])
    gt.createIndex()
    dt = gt.loadRes([{"image_id": p.image_id, "category_id": int(c), "score": float(s),
                      "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
                     for p in predictions for b, s, c in zip(p.boxes, p.scores, p.labels)])
    evaluator = COCOeval(gt, dt, iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    for name, value in zip(STAT_NAMES, evaluator.stats):
        assert result["stats"][name] == pytest.approx(float(value), abs=1e-9), name
