"""The pipeline's closing lines: AP, AP50 and one training-curve PNG over all training stages (real MLflow
store, no Ray). Measured: 8 s of CPU; 180 s wall on the saturated shared machine (load ~50)."""
from __future__ import annotations

from types import SimpleNamespace

from PIL import Image


def test_training_curves_join_the_stages_and_are_printed_last(tmp_path):
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from dino_platform.pipeline.runner import PipelineResult, _training_curves

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("curves", artifact_location=(tmp_path / "artifacts").as_uri())
    runs = {}
    for name, steps in (("pretrain", 10), ("finetune", 12)):
        runs[name] = client.create_run(experiment).info.run_id
        client.log_batch(runs[name], metrics=[Metric("loss", 10 - 0.5 * i, 0, i + 1) for i in range(steps)])
    client.log_batch(runs["finetune"], metrics=[Metric("eval/AP50", 0.1 * i, 0, 4 * i) for i in (1, 2, 3)])
    stages = {"ingest": "ingest", "pretrain": "train", "finetune": "train", "evaluate": "evaluate"}
    spec = SimpleNamespace(stages={k: SimpleNamespace(kind=v) for k, v in stages.items()}, name="p", preset="smoke",
                           output_root=str(tmp_path / "out"), experiment="curves")
    outputs = {"ingest": {}, "pretrain": {"run_id": runs["pretrain"], "checkpoint": "a"},
               "finetune": {"run_id": runs["finetune"], "checkpoint": "b"},
               "evaluate": {"metrics": {"AP": 0.2, "AP50": 0.4}, "run_id": "r"}}
    ctx = SimpleNamespace(spec=spec, tracking_uri=uri, outputs=outputs)

    png = _training_curves(ctx)
    assert png == str(tmp_path / "out" / "training_curves.png")
    assert Image.open(png).size[0] > Image.open(png).size[1]  # two panels side by side
    assert [a.path for a in client.list_artifacts(runs["finetune"], "curves")] == ["curves/pipeline.png"]
    lines = PipelineResult(spec=spec, state_uri="state.json", tracking_uri=uri, outputs=outputs,
                           actions={"ingest": {"action": "ran"}}, seconds=1.0, curves_png=png).summary().splitlines()
    assert lines[-2:] == ["result (evaluate): AP 0.2000  AP50 0.4000", f"training curves: {png}"]
