"""Starting Ray for a platform command that runs without a cluster (pipelines and sweeps).

Ray Train's ``PlacementGroupCleaner`` (a detached actor started with every ``TorchTrainer``) asks
the State API whether the training's controller is still alive, and frees the workers' placement
group once it is gone. The State API is served by the dashboard, so a local instance started here
keeps it on and tells its processes where it is (``RAY_API_SERVER_ADDRESS``, inherited by every
worker). Without that, with a second Ray instance on the host (a sweep or pipeline beside another
job, a test session) the cleaner's own lookup fails ("Found multiple active Ray instances"): the
log repeats "PlacementGroupCleaner: Failed to query Ray Train Controller actor state" and the
CPUs of a stopped trial stay reserved. A driver that joins a cluster (``ray job submit``) names
the cluster's State API in its job's runtime env for the same reason.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Dict, Optional


def init_local_ray(**options: Any) -> None:
    """``ray.init(address="local", **options)`` with the dashboard on and its State API named."""
    import ray

    options = dict(options)
    options["address"] = "local"
    if "dashboard_port" not in options:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            options["dashboard_port"] = probe.getsockname()[1]
    options.setdefault("dashboard_host", "127.0.0.1")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{options['dashboard_port']}"
    ray.init(include_dashboard=True, **options)


def init_ray(options: Dict[str, Any]) -> None:
    """Connect with ``ray.init(**options)``; a local instance (``address="local"``) via :func:`init_local_ray`."""
    import ray

    options = dict(options)
    if options.get("address") == "local":
        options.pop("address")
        init_local_ray(**options)
    else:
        ray.init(include_dashboard=True, **options)


def state_api_runtime_env(address: str) -> Optional[Dict[str, Any]]:
    """The ``runtime_env`` for ``ray.init(address=address)`` that names the cluster's State API
    (``RAY_API_SERVER_ADDRESS``) to every process of the job; None when it is already set or the
    cluster does not say where its dashboard is."""
    if os.environ.get("RAY_API_SERVER_ADDRESS"):
        return None
    try:
        from ray.dashboard.utils import get_address_for_submission_client

        url = get_address_for_submission_client(address)
    except Exception:  # no dashboard on that cluster: nothing to name
        return None
    return {"env_vars": {"RAY_API_SERVER_ADDRESS": url}} if url else None
