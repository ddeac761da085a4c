"""The stage kinds, one module each (``kind.StageKind``); the loader, preflight and runner loop over ``KINDS``.

A new kind: one module ending in ``KIND = StageKind(...)``, added to the tuple below."""
from __future__ import annotations

from typing import Dict

from dino_platform.pipeline.kind import StageKind
from dino_platform.pipeline.stages import evaluate, infer, ingest, predict, register, train

KINDS: Dict[str, StageKind] = {m.KIND.name: m.KIND for m in (ingest, train, evaluate, register, predict, infer)}

