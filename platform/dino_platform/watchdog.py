"""Stall watchdog: a long job that stops making progress says where it waits, then fails.

A ``Heartbeat`` is told the phase a process is in ("building model", "waiting for first batch",
"train step 12", "evaluating", "checkpointing") and beats whenever work completes. A daemon thread
compares the time since the last beat with the timeout; past it, it writes a report (the phase,
how long it has waited, the cluster's free resources per node, the tasks waiting for resources and
what they ask for, a diagnosis when no node can hold a whole CPU) and calls ``on_stall``.

The main thread may be blocked inside a C call (a collective, a Ray ``get``) that no Python
exception can reach, so the two actions offered end the wait from outside:

- ``exit_process``: the report goes to the log and to ``report_sink``, then ``os._exit``. A Ray
  Train worker dies, Ray Train counts a worker-group failure and restarts from the last checkpoint
  (``run.max_failures``); the driver reads the sink and puts the report in its error.
- ``interrupt``: raises ``KeyboardInterrupt`` in the watched thread; ``watch`` turns it into a
  ``StallError`` carrying the report (driver-side jobs: ``dino infer``, also inside the pipeline runner).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, TypeVar

from dino_platform.errors import StallError

log = logging.getLogger("dino.watchdog")

# what a Ray Data task asks for by default (ListFiles, map tasks without num_cpus)
DATA_TASK_CPUS = 1.0
# the default timeout, and the floor of one sized from step times
DEFAULT_STALL_TIMEOUT_S = 600.0
STEP_TIMES_PER_TIMEOUT = 20
STALL_EXIT_CODE = 75
REPORT_PART_TIMEOUT_S = 20.0

T = TypeVar("T")


def stall_timeout(configured: Optional[float], step_times: List[float]) -> float:
    """``configured`` if set; else the larger of 10 minutes and 20 times the median measured step time."""
    if configured is not None:
        return float(configured)
    if not step_times:
        return DEFAULT_STALL_TIMEOUT_S
    median = sorted(step_times)[len(step_times) // 2]
    return max(DEFAULT_STALL_TIMEOUT_S, STEP_TIMES_PER_TIMEOUT * median)


class Heartbeat:
    """Tracks a process's phase and last progress; on ``timeout_s`` without a beat, reports and acts.

    ``timeout_s``: seconds, or a callable giving the current timeout (it may grow with measured steps).
    ``details``: extra report lines from the caller (e.g. the Ray Data operators' stats).
    """

    def __init__(self, name: str, timeout_s, on_stall: Callable[[str], None],
                 details: Optional[Callable[[], str]] = None, poll_s: Optional[float] = None):
        self.name = name
        self._timeout = timeout_s if callable(timeout_s) else (lambda: float(timeout_s))
        self._on_stall, self._details = on_stall, details
        self._poll_s = poll_s
        self._phase, self._last = "starting", time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.report: Optional[str] = None

    def phase(self, text: str) -> None:
        """Enter a new phase; entering one counts as progress."""
        with self._lock:
            self._phase, self._last = text, time.monotonic()

    def beat(self) -> None:
        with self._lock:
            self._last = time.monotonic()

    def start(self) -> "Heartbeat":
        threading.Thread(target=self._watch, name=f"stall-watchdog-{self.name}", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.is_set():
            timeout = self._timeout()
            with self._lock:
                waited, phase = time.monotonic() - self._last, self._phase
            if waited > timeout:
                self.report = self._report(phase, waited, timeout)
                log.error("%s", self.report)
                self._on_stall(self.report)
                return
            self._stop.wait(self._poll_s or min(5.0, max(timeout / 10, 0.1)))

    def _report(self, phase: str, waited: float, timeout: float) -> str:
        lines = [f"STALL: {self.name} made no progress for {waited:.0f} s (stall timeout {timeout:.0f} s) "
                 f"while {phase!r}", _bounded(self._details) if self._details is not None else "",
                 _bounded(cluster_report)]
        return "\n".join(line for line in lines if line)


def exit_process(report_sink: Optional[Callable[[str], None]] = None) -> Callable[[str], None]:
    """on_stall action: hand the report to ``report_sink`` (e.g. a file in the run directory), then exit."""

    def act(report: str) -> None:
        if report_sink is not None:
            _safely(lambda: report_sink(report))
        logging.shutdown()
        os._exit(STALL_EXIT_CODE)

    return act


def interrupt(thread_id: int) -> Callable[[str], None]:
    """on_stall action: raise KeyboardInterrupt in thread ``thread_id`` (``watch`` turns it into StallError).

    In the main thread a real SIGINT, not ``_thread.interrupt_main``: the signal also ends a blocking
    system call (a sleep, a socket wait). Another thread gets the exception when it next runs
    Python code (a Ray wait loops in Python between short waits).
    """

    def act(report: str) -> None:
        if thread_id == threading.main_thread().ident:
            signal.pthread_kill(thread_id, signal.SIGINT)
        else:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(KeyboardInterrupt))

    return act


@contextlib.contextmanager
def watch(name: str, timeout_s, details: Optional[Callable[[], str]] = None) -> Iterator[Heartbeat]:
    """A driver-side watchdog around a block: a stall raises ``StallError`` with the report.

        with watch("dino ingest", 600) as heartbeat:
            for batch in batches:
                heartbeat.beat()
    """
    heartbeat = Heartbeat(name, timeout_s, interrupt(threading.get_ident()), details)
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    own_handler = previous is not None  # None: a handler set outside Python, which could not be put back

    def on_sigint(signum, frame):
        # the stall's SIGINT is ours whatever handler the process had (Ray Train installs one that
        # only aborts its own run); any other SIGINT goes where it went before
        if heartbeat.report is not None or previous == signal.SIG_DFL:
            raise KeyboardInterrupt
        if callable(previous):
            previous(signum, frame)

    if own_handler:
        signal.signal(signal.SIGINT, on_sigint)
    heartbeat.start()
    try:
        yield heartbeat
    except KeyboardInterrupt:
        if heartbeat.report is None:
            raise
        raise StallError(heartbeat.report) from None
    finally:
        heartbeat.stop()
        if own_handler:
            signal.signal(signal.SIGINT, previous)


def watched(items: Iterable[T], heartbeat: Heartbeat, phase: str) -> Iterator[T]:
    """``items``, beating the heartbeat at each one; the phase names what is awaited ('<phase> 3 of this pass')."""
    heartbeat.phase(f"{phase} 0 of this pass")
    for index, item in enumerate(items, 1):
        heartbeat.beat()
        yield item
        heartbeat.phase(f"{phase} {index} of this pass")


# ---------------------------------------------------------------------------------------------
# what the cluster looks like


def free_cpus_per_node() -> Dict[str, float]:
    """{node id: free CPUs} of the alive Ray nodes (empty when not connected)."""
    import ray
    from ray._private.state import available_resources_per_node

    if not ray.is_initialized():
        return {}
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    return {node: float(res.get("CPU", 0.0)) for node, res in available_resources_per_node().items()
            if node in alive}


def data_pipeline_starvation(free: Dict[str, float], reserve_hint: str = "") -> Optional[str]:
    """A diagnosis when no node has the whole CPU a Ray Data task asks for (ListFiles, map tasks), else None."""
    if not free:
        return None
    largest = max(free.values())
    if largest >= DATA_TASK_CPUS:
        return None
    total = sum(free.values())
    return (f"starved resource: CPU. Ray Data tasks ask for {DATA_TASK_CPUS:g} CPU on one node; the largest free "
            f"amount on any node is {largest:g} CPU ({total:g} free in all, split over {len(free)} nodes), so the "
            f"data pipeline cannot start. {reserve_hint}".rstrip())


def pending_tasks(limit: int = 20) -> List[str]:
    """'name: resources' of tasks waiting for a node (Ray's state API; empty if it is not reachable)."""
    from ray.util.state import list_tasks

    from dino_platform.ray_session import state_api_url

    tasks = list_tasks(address=state_api_url(), filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], limit=limit,
                       raise_on_missing_output=False, timeout=10)
    return [f"{t.name}: {getattr(t, 'required_resources', None) or '?'}" for t in tasks]


def data_operators() -> List[str]:
    """'dataset: operator STATE (progress, total, queued blocks)' for every Ray Data execution not finished,
    from Ray Data's stats actor (one per cluster); an operator short of progress is where a pass waits."""
    import ray
    from ray.data._internal.stats import STATS_ACTOR_NAME, STATS_ACTOR_NAMESPACE

    actor = ray.get_actor(STATS_ACTOR_NAME, namespace=STATS_ACTOR_NAMESPACE)
    lines = []
    for tag, dataset in ray.get(actor.get_datasets.remote(), timeout=10).items():
        if dataset.get("state") in ("FINISHED", "FAILED"):
            continue
        operators = dataset.get("operators", {})
        for operator, state in operators.items():
            numbers = ", ".join(f"{key} {state[key]}" for key in ("progress", "total", "queued_blocks") if key in state)
            lines.append(f"{tag}: {operator} {state.get('state', '?')}" + (f" ({numbers})" if numbers else ""))
        stalled = next((op for op, state in operators.items()
                        if state.get("state") == "RUNNING" and not state.get("progress")), None)
        if stalled is not None:
            lines.append(f"{tag}: stalled operator: {stalled} (the first one running without output yet)")
    return lines


def cluster_report() -> str:
    free = free_cpus_per_node()
    if not free:
        return ""
    lines = ["free CPUs per node: " + ", ".join(f"{node[:12]} {cpus:g}" for node, cpus in sorted(free.items()))]
    try:
        operators = data_operators()
        if operators:
            lines.append("Ray Data operators of unfinished passes:\n  " + "\n  ".join(operators))
    except Exception as exc:  # no Ray Data in this job, or its stats actor is gone
        lines.append(f"(Ray Data operators unavailable: {type(exc).__name__}: {exc})")
    with contextlib.suppress(Exception):
        import ray

        lines.append(f"free resources in all: {ray.available_resources()}")
    with contextlib.suppress(Exception):
        waiting = pending_tasks()
        if waiting:
            lines.append("tasks waiting for resources: " + "; ".join(waiting))
    diagnosis = data_pipeline_starvation(
        free, "Lower scaling.cpus_per_worker or scaling.num_workers, or keep training workers off a node "
              "(scaling.resources_per_worker with a custom resource), so one node keeps a whole CPU free.")
    if diagnosis:
        lines.append(diagnosis)
    return "\n".join(lines)


def _bounded(make: Callable[[], Optional[str]], seconds: float = REPORT_PART_TIMEOUT_S) -> str:
    """``make()`` in a thread of its own, given up after ``seconds``: a report about a stalled process
    must not stall in turn (e.g. on a Ray call to the very actor that is stuck)."""
    result: List[str] = []
    thread = threading.Thread(target=lambda: result.append(_safely(make)), daemon=True)
    thread.start()
    thread.join(seconds)
    return result[0] if result else f"({getattr(make, '__name__', 'report part')} did not answer in {seconds:g} s)"


def _safely(make: Callable[[], Optional[str]]) -> str:
    try:
        return make() or ""
    except Exception as exc:  # a report must not fail because one of its parts did
        return f"({getattr(make, '__name__', 'report part')} unavailable: {type(exc).__name__}: {exc})"
