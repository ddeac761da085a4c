"""The storage layer against the local filesystem and a real S3 server (moto) on loopback."""
from __future__ import annotations

import logging
import os
import pickle
import socket

import pyarrow.fs as pafs
import pytest

from support.s3 import S3_TEST_ACCESS_KEY, S3_TEST_SECRET_KEY
from dino_platform.errors import StorageError
from dino_platform.storage import StorageNotFoundError, resolve


def _roundtrip(root_uri: str) -> None:
    root = resolve(root_uri)
    root.child("a/b/one.bin").write_bytes(b"one")
    root.child("a/two.bin").write_bytes(b"two" * 1000)
    root.child("three.txt").write_bytes(b"")
    assert root.child("a/b/one.bin").read_bytes() == b"one"
    assert root.child("a/two.bin").size() == 3000
    assert root.list_files() == ["a/b/one.bin", "a/two.bin", "three.txt"]
    assert root.child("a").list_files(recursive=False) == ["two.bin"]
    assert root.child("a/two.bin").exists() and not root.child("a/nope.bin").exists()
    root.child("a/b/one.bin").write_bytes(b"replaced")
    assert root.child("a/b/one.bin").read_bytes() == b"replaced"
    root.child("a/b/one.bin").delete()
    assert root.list_files() == ["a/two.bin", "three.txt"]
    with pytest.raises(StorageNotFoundError, match="nope.bin"):
        root.child("a/nope.bin").read_bytes()
    assert resolve(root_uri + "/never-written").list_files() == []


def test_local_paths_and_file_uris(tmp_path, monkeypatch):
    _roundtrip(str(tmp_path / "plain"))
    _roundtrip(f"file://{tmp_path}/uri")
    monkeypatch.chdir(tmp_path)
    assert resolve("rel/x").path == str(tmp_path / "rel" / "x")  # absolute before it travels
    assert not [p for p in (tmp_path / "plain").rglob("*") if p.name.endswith(".tmp")]


def test_s3_roundtrip_through_moto(s3_bucket):
    _roundtrip(f"{s3_bucket}/prefix")
    location = resolve(f"{s3_bucket}/prefix")
    assert isinstance(location.fs, pafs.PyFileSystem)  # over the native S3FileSystem, see below
    assert isinstance(location.fs.handler.fs, pafs.S3FileSystem)
    assert location.path == f"{s3_bucket[5:]}/prefix"


def test_location_travels_by_pickle(s3_bucket):
    location = pickle.loads(pickle.dumps(resolve(f"{s3_bucket}/p")))
    location.child("x").write_bytes(b"ok")
    assert resolve(f"{s3_bucket}/p/x").read_bytes() == b"ok"


def test_unreachable_endpoint_names_uri_and_endpoint(monkeypatch, caplog, s3_endpoint):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StorageError) as info:
        resolve("s3://some-bucket/data/manifest.json").read_bytes()
    message = str(info.value)
    assert "s3://some-bucket/data/manifest.json" in message
    assert dead in message and "AWS_ENDPOINT_URL" in message
    for secret in (S3_TEST_SECRET_KEY, S3_TEST_ACCESS_KEY):
        assert secret not in message
        assert secret not in caplog.text
        assert secret not in repr(resolve("s3://some-bucket/x"))


def test_missing_bucket_is_named(s3_endpoint):
    with pytest.raises(StorageError, match="s3://no-such-bucket/x.*bucket .no-such-bucket. does not exist"):
        resolve("s3://no-such-bucket/x").list_files()


def test_bad_uris():
    with pytest.raises(StorageError, match="unsupported scheme 'gs'"):
        resolve("gs://bucket/x")
    with pytest.raises(StorageError, match="needs a bucket"):
        resolve("s3:///x")


def test_relative_output_root_of_a_submitted_job_goes_under_dino_home(tmp_path, monkeypatch):
    from dino_platform.storage import output_root

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert output_root("runs/x") == str(tmp_path / "runs" / "x")  # a plain run: the working dir
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what `ray job submit` sets for the driver
    monkeypatch.setenv("DINO_HOME", str(tmp_path / "home"))
    assert output_root("./runs/x") == str(tmp_path / "home" / "runs" / "x")
    assert output_root(str(tmp_path / "abs")) == str(tmp_path / "abs")
    assert output_root("s3://bucket/p") == "s3://bucket/p"
    monkeypatch.delenv("DINO_HOME")
    assert output_root("runs/x") == os.path.expanduser("~/.dino/runs/x")
