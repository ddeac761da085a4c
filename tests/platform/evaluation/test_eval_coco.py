"""COCO AP from gathered per-image truths/predictions: exact on known cases, independent of sharding."""
import random

import numpy as np
import pytest

from dino_platform.evaluation.coco_eval import ImagePrediction, ImageTruth, evaluate_coco

CATEGORIES = {1: "person", 3: "car", 7: "train"}


def _truths(n_images=6, seed=0):
    rng = np.random.default_rng(seed)
    truths = []
    for i in range(n_images):
        k = int(rng.integers(1, 4))
        xy = rng.uniform(0, 100, size=(k, 2))
        wh = rng.uniform(20, 80, size=(k, 2))
        truths.append(ImageTruth(image_id=100 + i, height=200, width=220,
                                 boxes=np.concatenate([xy, xy + wh], 1),
                                 labels=rng.choice([1, 3, 7], size=k)))
    return truths


def _perfect(truths):
    return [ImagePrediction(t.image_id, t.boxes.copy(), np.linspace(0.9, 0.5, len(t.labels)), t.labels.copy())
            for t in truths]


def test_perfect_predictions_score_one_and_per_class_uses_dataset_ids():
    truths = _truths()
    result = evaluate_coco(truths, _perfect(truths), CATEGORIES)
    assert result.stats["AP"] == pytest.approx(1.0)
    assert result.stats["AP50"] == pytest.approx(1.0)
    present = {int(c) for t in truths for c in t.labels}
    assert set(result.per_class_ap) == set(CATEGORIES)
    for cid in present:
        assert result.per_class_ap[cid] == pytest.approx(1.0)
    assert result.num_images == len(truths)


def test_wrong_labels_and_shifted_boxes_lower_ap():
    truths = _truths()
    preds = _perfect(truths)
    preds[0].labels[:] = 3 if preds[0].labels[0] != 3 else 1  # wrong class on image 0
    preds[1].boxes[:, [0, 2]] += 30  # poor localisation on image 1
    result = evaluate_coco(truths, preds, CATEGORIES)
    assert 0.3 < result.stats["AP"] < 1.0
    assert result.stats["AP50"] >= result.stats["AP75"]


def test_no_detections_scores_zero():
    truths = _truths()
    empty = [ImagePrediction(t.image_id, np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=int)) for t in truths]
    assert evaluate_coco(truths, empty, CATEGORIES).stats["AP"] == 0.0


def test_order_and_sharding_do_not_change_the_result():
    truths = _truths(n_images=10, seed=3)
    rng = np.random.default_rng(5)
    preds = []
    for t in truths:  # noisy predictions with tied scores, so order could matter if not canonicalised
        boxes = t.boxes + rng.normal(0, 6, size=t.boxes.shape)
        preds.append(ImagePrediction(t.image_id, boxes, np.full(len(boxes), 0.5), t.labels.copy()))
    reference = evaluate_coco(truths, preds, CATEGORIES)
    shuffled_t, shuffled_p = truths[:], preds[:]
    random.Random(1).shuffle(shuffled_t)
    random.Random(2).shuffle(shuffled_p)
    again = evaluate_coco(shuffled_t, shuffled_p, CATEGORIES)
    assert again.stats == reference.stats
    assert again.per_class_ap == pytest.approx(reference.per_class_ap, nan_ok=True)


def test_unknown_or_duplicate_images_are_errors():
    truths = _truths(n_images=2)
    with pytest.raises(ValueError, match="appears twice"):
        evaluate_coco(truths + truths[:1], [], CATEGORIES)
    stray = ImagePrediction(999, np.zeros((1, 4)), np.ones(1), np.ones(1, dtype=int))
    with pytest.raises(ValueError, match="no ground truth"):
        evaluate_coco(truths, [stray], CATEGORIES)
