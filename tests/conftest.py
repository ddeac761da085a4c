"""Shared fixtures: a real S3 server (moto) on loopback, one local Ray instance per session, and
synthetic training shards."""
from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import Any, Iterator

import pytest

from support.s3 import S3_TEST_ACCESS_KEY, S3_TEST_SECRET_KEY, create_bucket

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def _moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_endpoint(_moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """URL of a moto S3 server on 127.0.0.1, with AWS_* variables pointing at it for this test.

    The server's state is reset before each test. Create buckets with :func:`create_bucket`
    (or the ``s3_bucket`` fixture).
    """
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{_moto_server}/moto-api/reset", method="POST")).read()
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", _moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_TEST_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_TEST_SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    yield _moto_server


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the test endpoint, as ``s3://name``."""
    return create_bucket(s3_endpoint, f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """The ray module, initialised with a local instance (2 CPUs, no dashboard) shared by the
    session; shut down at the end."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh instance, never a cluster someone started on this host
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def process_group() -> Iterator[None]:
    """A one-process gloo default group for the whole session (DeepSpeed engines, collectives).

    One group, never re-created: DeepSpeed caches the groups it derives from the first default
    group, and a later test's fresh group is then "not registered"."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
