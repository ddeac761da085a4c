"""The pipeline's memory: ``<output_root>/pipeline_state.json``, one record per stage plus a run log.

    {"pipeline": "o365_pretrain_coco_ft",
     "stages": {"pretrain": {"fingerprint": "9c1e...", "status": "done", "outputs": {...},
                             "started_at": 1700000000.0, "finished_at": 1700003600.0, "attempts": 1}},
     "runs": [{"started_at": ..., "preset": "smoke", "actions": {"pretrain": {"action": "skipped"}}}]}

A stage's fingerprint hashes its config, the digests of the data it reads and the identity of the
weights it reads (``runner`` says when it is skipped). The file is rewritten atomically after every change.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Dict, Optional

from dino_platform.errors import DataError
from dino_platform.storage import resolve


def fingerprint(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` (sorted keys; non-JSON values by their str)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class PipelineState:
    def __init__(self, uri: str, pipeline: str):
        self.location = resolve(uri)
        self.data: Dict[str, Any] = {"pipeline": pipeline, "stages": {}, "runs": []}
        if self.location.exists():
            try:
                self.data = json.loads(self.location.read_bytes())
            except ValueError as exc:
                raise DataError(f"{self.location.uri}: not a pipeline state file ({exc}); move it away to start "
                                "over (finished checkpoints and shards are kept and found again)") from None
        self.run: Dict[str, Any] = {}

    @property
    def uri(self) -> str:
        return self.location.uri

    def stage(self, name: str) -> Optional[Dict[str, Any]]:
        return self.data["stages"].get(name)

    def begin_run(self, **info: Any) -> None:
        self.run = {"started_at": time.time(), **info, "actions": {}}
        self.data.setdefault("runs", []).append(self.run)
        self.save()

    def end_run(self, status: str) -> None:
        self.run["finished_at"] = time.time()
        self.run["status"] = status
        self.save()

    def note(self, stage: str, action: str, **details: Any) -> None:
        """What this run did with ``stage``: skipped / ran / resumed / failed / interrupted (+ details)."""
        self.run["actions"][stage] = {"action": action, **details}
        self.save()

    def start_stage(self, name: str, fp: str) -> None:
        previous = self.stage(name) or {}
        attempts = previous.get("attempts", 0) + 1 if previous.get("fingerprint") == fp else 1
        self.data["stages"][name] = {"fingerprint": fp, "status": "running", "outputs": {},
                                     "started_at": time.time(), "finished_at": None, "attempts": attempts}
        self.save()

    def finish_stage(self, name: str, outputs: Dict[str, Any]) -> None:
        record = self.data["stages"][name]
        record.update(status="done", outputs=outputs, finished_at=time.time())
        self.save()

    def fail_stage(self, name: str, error: str, status: str = "failed") -> None:
        """``status``: failed (an error) or interrupted (stopped); either way the next run redoes the stage."""
        record = self.data["stages"][name]
        record.update(status=status, error=error[:2000], finished_at=time.time())
        self.save()

    def save(self) -> None:
        self.location.write_bytes(json.dumps(self.data, indent=1, sort_keys=False, default=str).encode())
