"""The model artifact: written once, loaded from a directory, its model.pt or the registry, detecting as the model does."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

import dino_core
from dino_platform.errors import ConfigError
from dino_platform.model.artifact import CONFIG_FILE, MODEL_FILE, load_artifact, write_artifact
from dino_platform.model.config import ModelConfig

TRANSFORM = {"scale": 0.15}
CATEGORIES = {1: "person", 3: "car"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random dino_tiny (5 classes) written as an artifact directory, and one encoded picture."""
    from PIL import Image

    torch.manual_seed(0)
    model, _, postprocessor = dino_core.build_model("dino_tiny", num_classes=5)
    directory = tmp_path_factory.mktemp("artifact") / "model"
    write_artifact(directory, dino_core.export_official_state_dict(model), ModelConfig("dino_tiny", 5), TRANSFORM,
                   CATEGORIES, source="test")
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (72, 100, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG")
    return model.eval(), postprocessor, directory, buffer.getvalue()


def _model_detections(model, postprocessor, data):
    """The model's own post-processed detections of one picture, ranked: what a detector must report."""
    from dino_platform.model.detector import decode_for_eval, rank_and_clip

    picture, image = decode_for_eval(data, TRANSFORM)
    width, height = picture.size
    with torch.no_grad():
        image = torch.from_numpy(image)
        outputs = model(image, torch.zeros((1, image.shape[2], image.shape[3]), dtype=torch.bool))
        (result,) = postprocessor(outputs, torch.tensor([[height, width]]))
    return rank_and_clip(result["scores"].numpy(), result["labels"].numpy(), result["boxes"].numpy(), width, height)


def _check_same_as_model(artifact, tiny):
    model, postprocessor, _, data = tiny
    assert (artifact.model.preset, artifact.model.num_classes) == ("dino_tiny", 5)
    assert artifact.transform == TRANSFORM and artifact.categories == CATEGORIES
    detector = artifact.detector()
    _, detections = detector.detect(data, max_detections=20)
    scores, labels, boxes = _model_detections(model, postprocessor, data)
    assert len(detections) == 20
    np.testing.assert_allclose([d["score"] for d in detections], scores[:20], atol=5e-6)
    np.testing.assert_allclose([d["box"] for d in detections], boxes[:20], atol=5e-3)
    assert [d["label"] for d in detections] == labels[:20].tolist()
    assert {d["name"] for d in detections} <= set(CATEGORIES.values()) | {"0", "2", "4"}


def test_the_files_hold_the_model_without_pickled_code(tiny):
    _, _, directory, _ = tiny
    config = json.loads((directory / CONFIG_FILE).read_text())
    assert (config["preset"], config["num_classes"], config["categories"]["3"]) == ("dino_tiny", 5, "car")
    state = torch.load(directory / MODEL_FILE, weights_only=True)
    assert state.keys() == tiny[0].state_dict().keys()


@pytest.mark.parametrize("name", ["directory", "model.pt"])
def test_loaded_from_a_directory_or_its_weights_detects_as_the_model(tiny, name):
    _, _, directory, _ = tiny
    _check_same_as_model(load_artifact(str(directory if name == "directory" else directory / MODEL_FILE)), tiny)


def test_loaded_from_the_registry_detects_as_the_model(tiny, tmp_path):
    from mlflow import MlflowClient

    from dino_platform.registry.models import register_evaluated

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("t", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    registration = register_evaluated(uri, "dino-test", "champion", run, load_artifact(str(tiny[2])),
                                      {"AP": 0.1}, {})
    files = {f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(run, "model")}
    assert files == {MODEL_FILE, CONFIG_FILE}
    _check_same_as_model(load_artifact(registration.alias_uri, tracking_uri=uri), tiny)


def test_an_official_checkpoint_needs_its_model_named(tiny, tmp_path):
    model, _, _, _ = tiny
    official = tmp_path / "checkpoint0011_4scale.pth"
    torch.save({"model": model.state_dict(), "epoch": 11}, official)
    with pytest.raises(ConfigError, match="--preset and --num-classes"):
        load_artifact(str(official))
    artifact = load_artifact(str(official), preset="dino_tiny", num_classes=5)
    built, _ = artifact.build()
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), model.state_dict().values()))
