"""The platform through a flaky object store: a fault-injecting proxy (tests/support/s3_fault_proxy.py) on
127.0.0.1 in front of the moto server fails 30% of S3 requests (503 SlowDown before forwarding, 500
after the request landed, dropped connections). With ``AWS_MAX_ATTEMPTS=10`` ingest, a 2-worker
training that streams its shards from S3 and writes checkpoints there, and evaluation must give
exactly what a fault-free run gives, in every Ray task, Ray Data read task and Ray Train worker.
An endpoint that dies mid-ingest must end with a clear error and no manifest.

One module: the raw data, the fault-free references and the proxy are shared (module fixtures).
Measured wall time: 14 min on the 2-core dev machine at load average ~50 (six other jobs), of
which ~4 min was the clean training including a cold DeepSpeed extension build that CI's earlier
training tests warm; the faulty training + evaluation took 8.6 min (backoff included). Ingest and
the pickling tests take under a minute.
"""
from __future__ import annotations

import os
import pickle
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from support.s3 import S3_TEST_ACCESS_KEY, S3_TEST_SECRET_KEY, create_bucket
from support.s3_fault_proxy import FAULT_KINDS, FaultProxy

pytestmark = pytest.mark.slow

FAULT_RATE = 0.3
TRANSFORM = {"scale": 0.15}


@pytest.fixture(scope="module")
def proxy(_moto_server):
    """The fault proxy (healthy until a test sets ``fault_rate``), with AWS_* pointing at it."""
    patch = pytest.MonkeyPatch()
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        patch.delenv(name)
    with FaultProxy(_moto_server, seed=10) as fault_proxy:
        for name, value in {"AWS_ENDPOINT_URL": fault_proxy.url, "AWS_ACCESS_KEY_ID": S3_TEST_ACCESS_KEY,
                            "AWS_SECRET_ACCESS_KEY": S3_TEST_SECRET_KEY, "AWS_REGION": "us-east-1",
                            "AWS_MAX_ATTEMPTS": "10", "AWS_EC2_METADATA_DISABLED": "true",
                            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
            patch.setenv(name, value)
        yield fault_proxy
    patch.undo()


@pytest.fixture(scope="module")
def raw(proxy, _moto_server, tmp_path_factory):
    """Synthetic COCO train (8 images) and val (4 images) sets uploaded to a bucket, as S3 URIs."""
    import boto3

    from dino_platform.data.synth import SynthConfig, generate

    bucket = create_bucket(_moto_server, f"faults-{uuid.uuid4().hex[:8]}")
    client = boto3.client("s3", endpoint_url=_moto_server)  # straight to moto: setup is not under test
    local = tmp_path_factory.mktemp("raw")
    for split, images, seed in (("train", 8, 1), ("val", 4, 2)):
        generate(SynthConfig(kind="coco", images=images, seed=seed, size=(128, 96)), str(local / split))
        for path in sorted((local / split).rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket[5:], f"raw/{split}/{path.relative_to(local / split).as_posix()}")
    return bucket


def _ingest(raw: str, split: str, out: str, parallel: bool = True):
    from dino_platform.data.ingest import IngestConfig, ingest

    return ingest(IngestConfig("coco", f"{raw}/raw/{split}/annotations.json", f"{raw}/raw/{split}/images", out,
                               shard_size=3, parallel=parallel))


@pytest.fixture(scope="module")
def clean_shards(raw, proxy, ray_local):
    """Fault-free ingests of both splits: the reference manifests, and the shards the training reads."""
    proxy.configure(fault_rate=0.0)
    return {split: (f"{raw}/clean/{split}", _ingest(raw, split, f"{raw}/clean/{split}")) for split in ("train", "val")}


def _faulty(proxy: FaultProxy) -> None:
    proxy.configure(fault_rate=FAULT_RATE)


def _assert_all_fault_kinds(proxy: FaultProxy) -> None:
    assert all(proxy.counts[kind] > 0 for kind in FAULT_KINDS), dict(proxy.counts)


def test_a_pickled_filesystem_keeps_its_retries(proxy, raw):
    """The check behind the design: pyarrow's S3FileSystem pickles without its retry strategy; a
    Location (and its filesystem) rebuilds it from the settings."""
    from dino_platform.storage import resolve

    location = resolve(f"{raw}/raw/train/annotations.json")
    native = location.settings.native_filesystem()
    assert "retry_strategy" not in native.__reduce__()[1][0]  # timeouts travel, retries do not
    # Every request fails 6 times before it is forwarded: pyarrow's default 3 attempts give up (even
    # when curl resends each once on a new connection after a drop), 10 do not.
    proxy.configure(fault_rate=1.0, max_consecutive=6)
    with pytest.raises(OSError):
        pickle.loads(pickle.dumps(native)).get_file_info(location.path)
    travelled = pickle.loads(pickle.dumps(location))
    assert travelled.fs.get_file_info(travelled.path).size > 0
    assert pickle.loads(pickle.dumps(location.fs)).get_file_info(location.path + "-other").type == \
        pafs.FileType.NotFound
    assert travelled.settings.client().head_object(Bucket=location.path.split("/")[0],
                                                   Key=location.path.split("/", 1)[1])["ContentLength"] > 0
    proxy.configure(fault_rate=0.0)


def test_ingest_s3_to_s3_through_faults_equals_a_clean_run(proxy, raw, clean_shards):
    _faulty(proxy)
    for split in ("train", "val"):
        _, clean = clean_shards[split]
        flaky = _ingest(raw, split, f"{raw}/flaky/{split}")
        assert flaky.digest == clean.digest
        assert (flaky.images, flaky.annotations, len(flaky.shards)) == (clean.images, clean.annotations, len(clean.shards))
        assert flaky.quarantined == clean.quarantined and flaky.stats == clean.stats
    _assert_all_fault_kinds(proxy)
    proxy.configure(fault_rate=0.0)


def test_an_endpoint_that_dies_mid_ingest_leaves_no_manifest(proxy, raw, clean_shards, monkeypatch):
    from dino_platform.errors import StorageError
    from dino_platform.storage import resolve

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the answer, not the retries, is under test here
    out = f"{raw}/dead/train"
    proxy.configure(fault_rate=0.0, die_at="shard-00001")  # healthy until the second shard is written
    with pytest.raises(StorageError) as info:
        _ingest(raw, "train", out, parallel=False)
    message = str(info.value)
    assert f"{out}/shard-00001.parquet" in message and proxy.url in message, message
    assert "AWS_MAX_ATTEMPTS" in message and S3_TEST_SECRET_KEY not in message
    proxy.configure(fault_rate=0.0)
    assert not resolve(f"{out}/manifest.json").exists()
    assert "shard-00000.parquet" in resolve(out).list_files(recursive=False)  # finished work is kept
    assert _ingest(raw, "train", out, parallel=False).digest == clean_shards["train"][1].digest


def _job(shards, storage: str, name: str):
    from dino_platform.train.config import load_config

    return load_config({
        "data": {"train_uri": shards["train"][0], "eval_uri": shards["val"][0], "transform": TRANSFORM},
        "model": {"preset": "dino_tiny", "num_classes": 91},
        "optim": {"epochs": 1, "lr": 2e-4},
        "scaling": {"num_workers": 2, "batch_size_per_worker": 2},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "eval": {"batch_size": 2, "num_logged_images": 0},
        "checkpoint": {"every_n_epochs": 1, "num_to_keep": None},
        "run": {"name": name, "storage_path": storage, "seed": 7},
        "tracking": {"enabled": False},
    })


def _weights(checkpoint) -> dict:
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / "model.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def clean_training(proxy, raw, clean_shards):
    from dino_platform.train.trainer import run_training

    proxy.configure(fault_rate=0.0)
    outcome = run_training(_job(clean_shards, f"{raw}/runs", "clean"))
    assert outcome.error is None
    return outcome


def test_training_and_evaluation_through_faults_equal_a_clean_run(proxy, raw, clean_shards, clean_training):
    from dino_platform.evaluation.runner import run_evaluation
    from dino_platform.train.trainer import run_training

    _faulty(proxy)
    flaky = run_training(_job(clean_shards, f"{raw}/runs", "flaky"))
    assert flaky.error is None, flaky.error
    _assert_all_fault_kinds(proxy)  # the shards were read and the checkpoints written through faults
    trained_through_faults = dict(proxy.counts)
    assert flaky.metrics["step"] == clean_training.metrics["step"] == 2
    assert flaky.metrics["eval/AP"] == clean_training.metrics["eval/AP"]  # evaluation during training

    # A separate evaluation of the checkpoint on S3 (read by the workers) through faults
    proxy.configure(fault_rate=FAULT_RATE, seed=11)
    evaluated = run_evaluation(f"{flaky.run_dir}/{Path(flaky.checkpoint.path).name}", clean_shards["val"][0])
    assert proxy.faults() > 0
    proxy.configure(fault_rate=0.0)
    assert evaluated["stats"]["AP"] == clean_training.metrics["eval/AP"]
    clean, through_faults = _weights(clean_training.checkpoint), _weights(flaky.checkpoint)
    assert clean.keys() == through_faults.keys()
    assert not [k for k in clean if not torch.equal(clean[k], through_faults[k])], trained_through_faults
