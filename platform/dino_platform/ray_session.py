"""Joining Ray: every platform entry point (train, eval, ingest, infer, pipeline, sweep) calls ``connect``.

Ray Train's ``PlacementGroupCleaner`` (a detached actor started with every ``TorchTrainer``) asks
the State API whether the training's controller is still alive, and frees the workers' placement
group once it is gone. The State API is served by the dashboard, so a local instance started here
keeps it on. Without naming it, with a second Ray instance on the host (a sweep or pipeline beside
another job, a test session) the cleaner's own lookup fails ("Found multiple active Ray instances"):
the log repeats "PlacementGroupCleaner: Failed to query Ray Train Controller actor state" and the
CPUs of a stopped trial stay reserved. So ``connect`` names the State API of the instance it starts
or joins (``RAY_API_SERVER_ADDRESS``) in the job's runtime env, which every task and actor of the
job inherits, and the driver asks ``state_api_url()``.

The driver's own environment is left as it was: a variable that outlived its instance would send a
later ``ray job submit`` or a child process's State API calls to a dead or foreign dashboard.
"""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Optional

_STATE_API: Optional[tuple] = None  # (Ray session name, State API URL) of the instance connect joined or started


def state_api_url() -> Optional[str]:
    """The State API (dashboard) URL of the Ray instance this process is connected to, if ``connect``
    joined or started it; None otherwise (Ray's state calls then resolve it themselves)."""
    import ray

    if _STATE_API is None or not ray.is_initialized():
        return None
    session, url = _STATE_API
    return url if ray.get_runtime_context().get_session_name() == session else None


def connect(address: Optional[str] = None, *, num_cpus: Optional[int] = None, log_to_driver: bool = True,
            **options: Any) -> str:
    """Join Ray once per process; returns where, for the log.

    Already connected: nothing to do. Else the cluster at ``address``, else at ``$RAY_ADDRESS`` (set
    by ``ray job submit``), else a fresh local instance with ``num_cpus`` CPUs (all when None), never
    a cluster someone else started on this machine; ``address="local"`` asks for the local instance
    even when ``$RAY_ADDRESS`` is set. ``options``: further ``ray.init`` arguments.
    """
    import ray

    if ray.is_initialized():
        return "the Ray instance this process already uses"
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        url = None  # the cluster's State API (unless named already)
        if not os.environ.get("RAY_API_SERVER_ADDRESS"):
            with contextlib.suppress(Exception):  # no dashboard on that cluster: nothing to name
                from ray.dashboard.utils import get_address_for_submission_client

                url = get_address_for_submission_client(address)
        ray.init(address=address, log_to_driver=log_to_driver, **_naming(url, options))  # a cluster's CPUs are its own
        _remember(url or os.environ.get("RAY_API_SERVER_ADDRESS"))
        return f"Ray cluster at {address}"
    options.setdefault("dashboard_host", "127.0.0.1")
    if "dashboard_port" not in options:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            options["dashboard_port"] = probe.getsockname()[1]
    url = f"http://127.0.0.1:{options['dashboard_port']}"  # the dashboard on: Ray Train's cleaner needs it (above)
    ray.init(address="local", num_cpus=num_cpus, log_to_driver=log_to_driver, include_dashboard=True,
             **_naming(url, options))
    _remember(url)
    return f"a local Ray instance ({num_cpus or 'all'} CPUs)"


def _naming(url: Optional[str], options: dict) -> dict:
    """``options`` with ``url`` as the job's ``RAY_API_SERVER_ADDRESS`` (a value the caller's runtime env
    gives wins)."""
    if not url:
        return options
    runtime_env = dict(options.get("runtime_env") or {})
    runtime_env["env_vars"] = {"RAY_API_SERVER_ADDRESS": url, **(runtime_env.get("env_vars") or {})}
    return {**options, "runtime_env": runtime_env}


def _remember(url: Optional[str]) -> None:
    import ray

    global _STATE_API
    _STATE_API = (ray.get_runtime_context().get_session_name(), url) if url and ray.is_initialized() else None
