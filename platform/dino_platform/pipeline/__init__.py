"""Declarative pipelines: a YAML spec of datasets and stages, run in order with resumable stages.

    spec = load_spec("pipelines/o365_pretrain_coco_ft.yaml", preset="smoke", overrides=["output_root=/tmp/x"])
    result = run_pipeline(spec)

``load_spec`` checks all that needs no storage or cluster, ``run_pipeline`` the rest before the first
stage starts. Each stage kind is one module in ``pipeline/stages/`` (``kind.StageKind``); see ``docs/pipelines.md``.
"""
from dino_platform.pipeline.loader import load_spec
from dino_platform.pipeline.spec import PipelineSpec

__all__ = ["PipelineSpec", "load_spec"]
