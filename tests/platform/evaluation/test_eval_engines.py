"""faster-coco-eval and pycocotools give the same COCO numbers on awkward ground truth, and the
official DINO protocol (all num_select detections, per-category maxDets) differs from the
COCO-challenge top-100-per-image rule exactly where it should."""
import numpy as np
import pytest

from dino_platform.evaluation.coco_eval import (
    STAT_NAMES, Detections, EvalProtocol, ImagePrediction, ImageTruth, evaluate_coco,
)

CATEGORIES = {1: "person", 2: "bicycle", 5: "bus", 9: "boat", 11: "no-ground-truth"}


def _quirky_set(seed=0, n_images=40):
    """Crowd boxes, small/medium/large areas (some given explicitly, unlike the box), images with no
    annotations, a class with no ground truth, duplicate scores and detections of unknown classes."""
    rng = np.random.default_rng(seed)
    truths, predictions = [], []
    for i in range(n_images):
        if i % 7 == 3:  # an image without annotations (its detections are all false positives)
            k = 0
        else:
            k = int(rng.integers(1, 7))
        side = rng.choice([12.0, 60.0, 180.0], size=k)  # area < 32², < 96², larger
        xy = rng.uniform(0, 300, size=(k, 2))
        wh = side[:, None] * rng.uniform(0.6, 1.4, size=(k, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        labels = rng.choice([1, 2, 5, 9], size=k)
        iscrowd = (rng.uniform(size=k) < 0.15).astype(np.int64)
        area = wh.prod(1) * rng.choice([1.0, 0.5], size=k)  # segment areas below the box area
        truths.append(ImageTruth(image_id=1000 + i, height=480, width=640, boxes=boxes, labels=labels,
                                 iscrowd=iscrowd, area=area))
        m = int(rng.integers(0, 25)) if i % 5 else 240  # some images past maxDets per class
        noisy = np.concatenate([boxes + rng.normal(0, 1, boxes.shape) * 0.08 * side[:, None],
                                rng.uniform(0, 400, (m, 2)) @ np.array([[1, 0, 1, 0], [0, 1, 0, 1]])
                                + np.concatenate([np.zeros((m, 2)), rng.uniform(10, 150, (m, 2))], 1)])
        scores = np.round(rng.uniform(0.05, 1.0, size=len(noisy)), 1)  # many exact ties
        dlabels = np.concatenate([labels, rng.choice([1, 2, 5, 9, 11, 42], size=m)])  # 42: not a category
        predictions.append(ImagePrediction(1000 + i, noisy.astype(np.float32), scores.astype(np.float32), dlabels))
    return truths, predictions


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("per_image", [None, 100, 10])
def test_engines_agree_to_1e9_on_quirky_ground_truth(seed, per_image):
    truths, predictions = _quirky_set(seed)
    fast = evaluate_coco(truths, predictions, CATEGORIES,
                         EvalProtocol(detections_per_image=per_image, engine="faster_coco_eval"))
    ref = evaluate_coco(truths, predictions, CATEGORIES,
                        EvalProtocol(detections_per_image=per_image, engine="pycocotools"))
    assert 0.02 < ref.stats["AP"] < 0.95 and ref.stats["AR100"] > 0.3  # a non-trivial score, or agreement would prove little
    for name in STAT_NAMES:
        assert fast.stats[name] == pytest.approx(ref.stats[name], abs=1e-9), name
    assert set(fast.per_class_ap) == set(ref.per_class_ap) == set(CATEGORIES)
    assert np.isnan(ref.per_class_ap[11]) and np.isnan(fast.per_class_ap[11])  # no ground truth: no AP
    for cid in (1, 2, 5, 9):
        assert fast.per_class_ap[cid] == pytest.approx(ref.per_class_ap[cid], abs=1e-9), cid
    assert fast.detections == ref.detections and fast.protocol["engine"] != ref.protocol["engine"]


def _crowded_image():
    """One image whose 12 objects of 4 classes are each found, but with 100 confident false
    positives of class 1 ranked above the true positives of classes 2-4."""
    boxes, labels = [], []
    for c in range(4):
        for j in range(3):
            x = 50.0 * (3 * c + j)
            boxes.append([x, 10.0, x + 40.0, 50.0])
            labels.append(c + 1)
    truth = ImageTruth(image_id=7, height=200, width=800, boxes=np.array(boxes), labels=np.array(labels))
    fp = np.array([[10.0 + i, 120.0, 30.0 + i, 150.0] for i in range(100)])
    det_boxes = np.concatenate([fp, np.array(boxes)])
    scores = np.concatenate([np.linspace(0.99, 0.9, 100), np.full(12, 0.5)])
    det_labels = np.concatenate([np.ones(100, dtype=np.int64), np.array(labels)])
    return truth, ImagePrediction(7, det_boxes, scores, det_labels)


def test_official_protocol_keeps_every_detection_and_differs_from_the_per_image_cut():
    truth, prediction = _crowded_image()
    categories = {1: "a", 2: "b", 3: "c", 4: "d"}
    official = evaluate_coco([truth], [prediction], categories, EvalProtocol(num_select=300))
    challenge = evaluate_coco([truth], [prediction], categories,
                              EvalProtocol(num_select=300, detections_per_image=100))
    assert official.num_detections == 112 and challenge.num_detections == 100
    # official: classes 2-4 keep their 3 true positives (maxDets=100 is per category) -> AP 1 each;
    # class 1's 3 true positives rank below its own 100 false positives, past the per-category cap
    # -> AP 0, AR100 = 3/4. The top-100 cut across classes removes every true positive (they all
    # score 0.5): AP 0 and AR100 0.
    assert official.per_class_ap[2] == official.per_class_ap[3] == official.per_class_ap[4] == pytest.approx(1.0)
    assert challenge.stats["AP"] == 0.0 and challenge.stats["AR100"] == 0.0
    assert official.per_class_ap[1] == 0.0 and official.stats["AR100"] == pytest.approx(0.75)
    assert official.stats["AP"] == pytest.approx(0.75)
    assert official.protocol["key"] == "official/num_select=300/maxDets=100"
    assert challenge.protocol["key"] == "top100-per-image/num_select=300/maxDets=100"


def test_columnar_detections_score_like_per_image_predictions():
    truths, predictions = _quirky_set(3, n_images=12)
    half = len(predictions) // 2
    columnar = Detections.concat([Detections.from_predictions(predictions[half:]),
                                  Detections.from_predictions(predictions[:half])])
    assert evaluate_coco(truths, columnar, CATEGORIES).stats == evaluate_coco(truths, predictions, CATEGORIES).stats


def test_protocol_validates_its_fields():
    with pytest.raises(ValueError, match="engine"):
        EvalProtocol(engine="detectron2")
    with pytest.raises(ValueError, match="detections_per_image"):
        EvalProtocol(detections_per_image=0)
    with pytest.raises(ValueError, match="maxDets=100"):  # pycocotools' summary AP is fixed there
        EvalProtocol(max_dets=20, engine="pycocotools")


def test_champion_gate_compares_only_versions_scored_under_the_same_protocol(tmp_path):
    """A real MLflow registry (SQLite): a higher AP under another protocol does not take the alias."""
    from mlflow import MlflowClient

    from dino_platform.evaluation.coco_eval import PROTOCOL_TAG, protocol_tags
    from dino_platform.registry.models import _decide_alias

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("dino-test")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    official = protocol_tags(EvalProtocol(num_select=300).to_dict())
    top100 = protocol_tags(EvalProtocol(num_select=300, detections_per_image=100).to_dict())

    def version(ap, tags):
        return client.create_model_version("dino-test", source=str(tmp_path), run_id=run_id,
                                           tags={"AP": str(ap), **tags})

    first = _decide_alias(client, "dino-test", "champion", version(0.40, official), 0.40, run_id, PROTOCOL_TAG)
    assert first.promoted
    other = _decide_alias(client, "dino-test", "champion", version(0.45, top100), 0.45, run_id, PROTOCOL_TAG)
    assert not other.promoted and "protocol" in other.decision and other.champion_version == first.version
    better = _decide_alias(client, "dino-test", "champion", version(0.42, official), 0.42, run_id, PROTOCOL_TAG)
    assert better.promoted and better.champion_version == better.version
