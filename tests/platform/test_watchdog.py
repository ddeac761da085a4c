"""The stall watchdog: it fires only without progress, names the phase, and ends a blocked wait."""
import signal
import threading
import time

import pytest

from dino_platform import watchdog
from dino_platform.errors import ConfigError, StallError
from dino_platform.train.config import TrainConfig, load_config


def test_fires_without_progress_and_names_the_phase():
    reports = []
    fired = threading.Event()
    heartbeat = watchdog.Heartbeat("test job", 0.3, lambda r: (reports.append(r), fired.set()), poll_s=0.05)
    heartbeat.start()
    heartbeat.phase("waiting for first batch")
    assert fired.wait(5.0)
    assert len(reports) == 1
    assert "test job made no progress" in reports[0]
    assert "'waiting for first batch'" in reports[0]


def test_beats_keep_it_quiet():
    fired = threading.Event()
    heartbeat = watchdog.Heartbeat("busy job", 0.4, lambda r: fired.set(), poll_s=0.05).start()
    for step in range(12):
        heartbeat.phase(f"train step {step}")
        time.sleep(0.1)
    heartbeat.stop()
    assert not fired.is_set()


def test_watch_ends_a_blocked_main_thread_with_the_report():
    started = time.monotonic()
    with pytest.raises(StallError) as caught:
        with watchdog.watch("dino ingest", 0.5, details=lambda: "operator ReadShards: 3 tasks pending") as heartbeat:
            heartbeat.phase("reading shard 7")
            time.sleep(30)  # blocked: only a signal ends it
    assert time.monotonic() - started < 10
    assert "reading shard 7" in caught.value.report
    assert "operator ReadShards: 3 tasks pending" in str(caught.value)


def test_watch_fires_under_a_process_sigint_handler_and_restores_it():
    """A driver that ran a Ray Train job has Ray's SIGINT handler installed (it only aborts its own
    run): the stall still ends the block, and the handler is back afterwards."""
    calls = []

    def swallowing_handler(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGINT, swallowing_handler)
    try:
        started = time.monotonic()
        with pytest.raises(StallError, match="reading shard 2"):
            with watchdog.watch("dino ingest", 0.5) as heartbeat:
                heartbeat.phase("reading shard 2")
                time.sleep(30)
        assert time.monotonic() - started < 10
        assert calls == [] and signal.getsignal(signal.SIGINT) is swallowing_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_watched_iterator_reports_the_awaited_item():
    def blocking_reader():
        yield 1
        time.sleep(30)
        yield 2

    with pytest.raises(StallError, match="batch 1 of this pass"):
        with watchdog.watch("dino infer", 0.5) as heartbeat:
            assert list(watchdog.watched(blocking_reader(), heartbeat, "batch")) == [1, 2]


def test_starvation_diagnosis_names_the_numbers():
    message = watchdog.data_pipeline_starvation({"head": 0.5, "node2": 0.5}, "Lower scaling.cpus_per_worker.")
    assert "starved resource: CPU" in message
    assert "largest free amount on any node is 0.5 CPU (1 free in all, split over 2 nodes)" in message
    assert "scaling.cpus_per_worker" in message
    assert watchdog.data_pipeline_starvation({"head": 0.5, "node2": 1.0}) is None
    assert watchdog.data_pipeline_starvation({}) is None


def test_timeout_sized_from_step_times():
    assert watchdog.stall_timeout(42.0, [100.0]) == 42.0
    assert watchdog.stall_timeout(None, []) == 600.0
    assert watchdog.stall_timeout(None, [1.0, 2.0, 3.0]) == 600.0
    assert watchdog.stall_timeout(None, [40.0, 50.0, 60.0]) == 1000.0


def test_stall_timeout_is_validated():
    cfg = TrainConfig().to_dict()
    cfg["data"]["train_uri"] = "/tmp/shards"
    cfg["run"]["stall_timeout_s"] = 0
    with pytest.raises(ConfigError, match=r"run\.stall_timeout_s: 0(\.0)? must be > 0"):
        load_config(cfg)
    cfg["run"]["stall_timeout_s"] = 30
    assert load_config(cfg).run.stall_timeout_s == 30


def test_watch_ends_a_stalled_worker_thread():
    caught = []

    def job():
        try:
            with watchdog.watch("pipeline stage infer", 0.3):
                for _ in range(300):
                    time.sleep(0.1)  # a wait that returns to Python now and then, as Ray's do
        except StallError as exc:
            caught.append(exc)

    thread = threading.Thread(target=job)
    thread.start()
    thread.join(15)
    assert not thread.is_alive()
    assert len(caught) == 1 and "pipeline stage infer made no progress" in caught[0].report


def test_collectives_time_out_after_the_watchdog():
    from dino_platform.train.trainer import collective_timeout_s

    cfg = TrainConfig().to_dict()
    cfg["data"]["train_uri"] = "/tmp/shards"
    assert collective_timeout_s(load_config(cfg)) == 900  # unset: 1.5 x the 600 s floor
    cfg["run"]["stall_timeout_s"] = 30
    assert collective_timeout_s(load_config(cfg)) == 45
