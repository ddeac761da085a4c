"""Evaluation predictions must not depend on how images are batched (DINO issue #231)."""
import numpy as np
import pytest
import torch

import dino_core
from dino_platform.evaluation.inference import predict_batch, valid_sizes


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    model, _, postprocessor = dino_core.build_model("dino_tiny", num_classes=91)
    return model.eval(), postprocessor


def _pad(images):
    h = max(i.shape[1] for i in images)
    w = max(i.shape[2] for i in images)
    batch = torch.zeros(len(images), 3, h, w)
    mask = torch.ones(len(images), h, w, dtype=torch.bool)
    for k, image in enumerate(images):
        batch[k, :, : image.shape[1], : image.shape[2]] = image
        mask[k, : image.shape[1], : image.shape[2]] = False
    return batch, mask


def _targets(images):
    return [{"image_id": torch.tensor(10 + k), "orig_size": torch.tensor([2 * i.shape[1], 2 * i.shape[2]])}
            for k, i in enumerate(images)]


def test_valid_sizes_read_the_mask():
    _, mask = _pad([torch.zeros(3, 40, 64), torch.zeros(3, 64, 48)])
    assert valid_sizes(mask) == [(40, 64), (64, 48)]


def test_predictions_are_the_same_alone_and_in_any_padded_batch(detector):
    model, postprocessor = detector
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 96, 128, generator=g), torch.randn(3, 128, 96, generator=g),
              torch.randn(3, 96, 96, generator=g), torch.randn(3, 96, 128, generator=g)]
    alone = [predict_batch(model, postprocessor, *_pad([im]), _targets([im]), 100)[0] for im in images]
    batch, mask = _pad(images)
    together = predict_batch(model, postprocessor, batch, mask, _targets(images), 100)
    for a, b in zip(alone, together):
        assert np.array_equal(a.scores, b.scores) and np.array_equal(a.boxes, b.boxes)
        assert np.array_equal(a.labels, b.labels)
    assert together[0].image_id == 10 and together[0].boxes.shape == (100, 4)


def test_naive_padded_forward_would_change_the_outputs(detector):
    """Why predict_batch runs images one by one: the model's mask alone does not make padding inert."""
    model, _ = detector
    g = torch.Generator().manual_seed(2)
    small, large = torch.randn(3, 96, 128, generator=g), torch.randn(3, 128, 128, generator=g)
    with torch.no_grad():
        alone = model(small[None])["pred_logits"][0]
        batch, mask = _pad([small, large])
        padded = model(batch, mask)["pred_logits"][0]
    assert not torch.allclose(alone, padded, atol=1e-3)
