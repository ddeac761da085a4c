"""From a trial's training job to Tune: every Ray Train report, with a pointer to the newest checkpoint.

Ray's ``TuneReportCallback`` forwards metrics only, but PBT clones the checkpoint on the results it
acts on. So a trial runs ``TorchTrainer.fit()`` in a thread and re-reports each training report to
Tune from its own thread, once a checkpoint exists with a *pointer* checkpoint: a directory holding
``train_checkpoint.json`` (the training checkpoint's URI, trial, run, step, epoch), so Tune never
copies weights. ``checkpoint_path`` appears in the metrics only of the report that saved it.

    pointer = read_pointer(tune.get_checkpoint())   # None for a fresh trial
"""
from __future__ import annotations

import json
import queue as queue_module
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ray.train.v2.api.callback import UserCallback

CHECKPOINT_KEY = "checkpoint_path"  # the training checkpoint's path, in the reported metrics
POINTER_FILE = "train_checkpoint.json"
_DONE = "__dino_training_done__"


class ForwardReports(UserCallback):
    """Runs in the Train controller: puts rank 0's metrics (+ checkpoint path) on the trial's queue."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics: List[Dict[str, Any]], checkpoint) -> None:
        item = dict(metrics[0])
        if checkpoint is not None:
            item[CHECKPOINT_KEY] = checkpoint.path
        self.queue.put(item)


def fit_and_report(fit: Callable[[List[Any]], Any], trial_id: str, run_name: str, storage_root: str,
                   poll_s: float = 1.0) -> Any:
    """Call ``fit(callbacks)`` in a thread and re-report its reports to Tune from this one; return what ``fit``
    returned or re-raise what it raised. ``storage_root``: the URI the reported checkpoint paths are relative to."""
    from ray import tune
    from ray.util.queue import Queue

    reports = Queue(actor_options={"num_cpus": 0})
    outcome: Dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fit([ForwardReports(reports)])
        except BaseException as exc:  # handed to the trial's thread below
            outcome["error"] = exc
        finally:
            reports.put(_DONE)

    thread = threading.Thread(target=target, name=f"fit-{run_name}", daemon=True)
    thread.start()
    latest: Optional[Dict[str, Any]] = None  # pointer to the newest training checkpoint
    try:
        while True:
            try:
                item = reports.get(timeout=poll_s)
            except queue_module.Empty:
                continue
            if item == _DONE:
                break
            latest = _report(tune, item, latest, trial_id, run_name, storage_root)
        thread.join()
    finally:
        reports.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _report(tune, metrics: Dict[str, Any], latest: Optional[Dict[str, Any]], trial_id: str, run_name: str,
            storage_root: str) -> Optional[Dict[str, Any]]:
    """Report ``metrics`` to Tune with a pointer to the newest training checkpoint; return that pointer.

    Every report after the first checkpoint carries it: when PBT asks a running trial for its checkpoint,
    Tune hands over the trial's *last* result, often a progress report made after the checkpoint.
    """
    path = metrics.get(CHECKPOINT_KEY)
    if path is not None:  # relative to its filesystem's root: the URI the platform resolves
        uri = f"s3://{path.lstrip('/')}" if storage_root.startswith("s3://") else path
        metrics = {**metrics, CHECKPOINT_KEY: uri}
        latest = {"uri": uri, "trial_id": trial_id, "run_name": run_name,
                  "step": metrics.get("step"), "epoch": metrics.get("epoch")}
    if latest is None:
        tune.report(metrics)
        return None
    with tempfile.TemporaryDirectory(prefix="dino-pointer-") as directory:
        (Path(directory) / POINTER_FILE).write_text(json.dumps(latest, indent=1))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
    return latest


def read_pointer(checkpoint) -> Optional[Dict[str, Any]]:
    """The pointer a Tune checkpoint of this module holds, or None (no checkpoint, or not ours)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        file = Path(directory) / POINTER_FILE
        return json.loads(file.read_text()) if file.is_file() else None
