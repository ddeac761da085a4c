"""A stage kind is one module: an example kind defined here is loaded, validated, run, skipped and
summarised by the pipeline's generic code without touching it (docs/pipelines.md, "Adding a stage kind")."""
from __future__ import annotations

import ast
from dataclasses import dataclass

import pytest

from dino_platform.errors import ConfigError
from dino_platform.pipeline.kind import StageKind
from dino_platform.pipeline.state import fingerprint
from support import REPO



# --- the whole example kind: what a new file pipeline/stages/echo.py would hold -------------
@dataclass
class EchoStage:
    kind: str = "echo"
    text: str = ""


def _validate(scope, name: str, stage: EchoStage) -> None:
    if not stage.text:
        raise ConfigError(f"stages.{name}.text: required")


ECHO = StageKind("echo", EchoStage, ("text",), _validate,
                 fingerprint=lambda ctx, name, stage: fingerprint("echo", stage.text),
                 run=lambda ctx, name, stage, fp: ({"text": stage.text.upper()}, {}),
                 outputs_exist=lambda ctx, outputs: True, summary=lambda outputs: outputs["text"])
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def echo_kind(monkeypatch):
    from dino_platform.pipeline.stages import KINDS

    monkeypatch.setitem(KINDS, "echo", ECHO)  # a shipped kind is listed in pipeline/stages/__init__.py
    return ECHO


def _spec(tmp_path, *overrides):
    from dino_platform.pipeline import load_spec

    return load_spec(REPO / "pipelines" / "o365_pretrain_coco_ft.yaml", preset="smoke",
                     overrides=[f"output_root={tmp_path / 'out'}", *overrides])


def test_a_new_kind_is_one_registered_module(tmp_path, echo_kind):
    from dino_platform.pipeline.context import StageContext
    from dino_platform.pipeline.runner import PipelineResult, _run_stage
    from dino_platform.pipeline.state import PipelineState

    spec = _spec(tmp_path, "stages.shout={kind: echo, text: hello}")
    assert isinstance(spec.stages["shout"], EchoStage)
    with pytest.raises(ConfigError, match=r"stages\.shout\.text: required"):
        _spec(tmp_path, "stages.shout={kind: echo}")
    with pytest.raises(ConfigError, match=r"unknown field stages\.shout\.txt; .*did you mean stages\.shout\.text\?"):
        _spec(tmp_path, "stages.shout={kind: echo, txt: hello}")
    # the kind's outputs are what later stages may read: a predict stage cannot read a model from it
    with pytest.raises(ConfigError, match=r"reads model or checkpoint from 'shout', but shout is a echo stage, "
                                          r"which produces text"):
        _spec(tmp_path, "stages={shout: {kind: echo, text: hi}, ingest: {kind: ingest, datasets: [coco_val]}, "
                        "predict: {kind: predict, model: {stage: shout}, dataset: coco_val}}")

    ctx = StageContext(spec=spec, state=PipelineState(spec.state_uri, spec.name),
                       tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", git_commit="test")
    for expected in ("ran", "skipped"):
        ctx.state.begin_run(preset="test")
        _run_stage(ctx, "shout", spec.stages["shout"])
        ctx.state.end_run("done")
        assert ctx.state.run["actions"]["shout"]["action"] == expected
    assert ctx.outputs["shout"] == {"text": "HELLO"}
    result = PipelineResult(spec=spec, state_uri=spec.state_uri, tracking_uri="http://mlflow:5000",
                            outputs={"shout": ctx.outputs["shout"]}, actions={"shout": {"action": "ran"}}, seconds=1)
    assert "  shout:        HELLO" in result.summary().splitlines()


def test_spec_and_validation_do_not_import_each_other():
    def imports(module: str):
        tree = ast.parse((REPO / "platform" / "dino_platform" / "pipeline" / f"{module}.py").read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}

    assert not {m for m in imports("spec") if m.startswith("dino_platform.pipeline")}
    assert not {m for m in imports("validation") if m.startswith("dino_platform.pipeline.")} - {"dino_platform.pipeline.spec"}
