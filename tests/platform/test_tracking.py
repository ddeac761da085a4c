"""MLflow tracking against a real SQLite store: one run per job, resume continues it, curves drawn."""
import numpy as np
import pytest
from PIL import Image

from dino_platform.drawing import draw_detections
from dino_platform.tracking import MetricsLogger, finish_run, resolve_tracking_uri, start_or_resume_run
from dino_platform.train.config import flat_params, load_config


@pytest.fixture
def cfg():
    return load_config({"data": {"train_uri": "s3://b/train"},
                        "tracking": {"tracking_uri": "https://bob:s3cret@tracker.example"}})


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path / "run") == f"sqlite:///{(tmp_path / 'run').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"


def test_one_run_per_job_with_metrics_params_and_curves(tmp_path, cfg):
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db", tmp_path)
    start = dict(tracking_uri=uri, experiment="exp", run_key="/runs/job-a", run_name="job-a",
                 params=flat_params(cfg), config_yaml=cfg.to_yaml(), artifact_dir=tmp_path / "mlartifacts")
    target = start_or_resume_run(**start)
    logger = MetricsLogger(target)
    for step in range(1, 6):
        logger.log_metrics({"loss": 5.0 / step, "loss_ce": 1.0 / step, "lr": 1e-4}, step=step)
    logger.log_metrics({"eval/AP": 0.1, "eval/AP50": 0.3}, step=5)
    logger.log_dict({"stats": {"AP": 0.1}}, "eval/coco_eval_step5.json")

    again = start_or_resume_run(**start)  # a resumed job continues the same MLflow run
    assert again.run_id == target.run_id
    MetricsLogger(again).log_metrics({"loss": 0.5}, step=6)
    finish_run(again)

    client = MlflowClient(uri)
    run = client.get_run(target.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.0001"
    assert "s3cret" not in str(run.data.params)
    assert [m.value for m in client.get_metric_history(target.run_id, "loss")] == [5.0, 2.5, 5 / 3, 1.25, 1.0, 0.5]
    artifacts = {a.path for a in client.list_artifacts(target.run_id)}
    assert {"config.yaml", "config_resume_1.yaml", "curves", "eval"} <= artifacts
    curves = {a.path for a in client.list_artifacts(target.run_id, "curves")}
    assert curves == {"curves/loss.png", "curves/ap.png"}
    png = client.download_artifacts(target.run_id, "curves/loss.png", str(tmp_path / "dl"))
    assert Image.open(png).size[0] > 100
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_draw_detections_marks_the_boxes():
    image = Image.fromarray(np.zeros((64, 80, 3), dtype=np.uint8))
    drawn = np.asarray(draw_detections(image, [[10, 10, 40, 50]], [3], [0.9], {3: "car"}, min_side=0))
    assert drawn.shape == (64, 80, 3)
    assert drawn[50, 20].any() and drawn[30, 40].any() and not drawn[30, 70].any() and not drawn[30, 25].any()


def test_draw_detections_enlarges_small_pictures_by_a_whole_factor():
    image = Image.fromarray(np.zeros((120, 160, 3), dtype=np.uint8))
    drawn = np.asarray(draw_detections(image, [[10, 10, 40, 50]], [3], [0.9], {3: "car"}))
    assert drawn.shape == (480, 640, 3)  # 120 px short side -> x4
    assert drawn[200, 80].any() and drawn[120, 160].any()  # bottom and right edges moved with the factor
    assert not drawn[120, 100].any() and not drawn[300, 400].any()  # inside the box, and far outside
    big = Image.fromarray(np.zeros((600, 800, 3), dtype=np.uint8))
    assert draw_detections(big, [], [], [], {}).size == (800, 600)  # large enough: unchanged
