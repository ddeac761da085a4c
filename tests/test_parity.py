"""dino_core reproduces the official DINO (R50 4-scale) on the recorded parity fixture."""
import pytest
import torch

import dino_core
from parity import load_fixture, official_state_dict


@pytest.fixture(scope="module")
def fixture():
    return load_fixture("r50_4scale")


@pytest.fixture(scope="module")
def loaded(fixture):
    torch.manual_seed(0)
    model, criterion, post = dino_core.build_model("dino_r50_4scale", num_classes=91, dn_box_noise_scale=1.0)
    report = dino_core.load_official_state_dict(model, {"model": official_state_dict(fixture)})
    assert not report.reinitialized and not report.missing and not report.skipped
    model.eval()
    with torch.no_grad():
        out = model(fixture["inputs"]["batch"], fixture["inputs"]["mask"])
    return model, criterion, post, out


def _close(a, b, atol):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= atol, f"max abs error {err} > {atol}"


def test_eval_outputs_match(fixture, loaded):
    out, ref = loaded[3], fixture["eval_outputs"]
    _close(out["pred_logits"], ref["pred_logits"], 1e-3)
    _close(out["pred_boxes"], ref["pred_boxes"], 1e-4)
    assert len(out["aux_outputs"]) == len(ref["aux_outputs"]) == 5
    for mine, theirs in zip(out["aux_outputs"], ref["aux_outputs"]):
        _close(mine["pred_logits"], theirs["pred_logits"], 1e-3)
        _close(mine["pred_boxes"], theirs["pred_boxes"], 1e-4)
    for key in ("interm_outputs", "interm_outputs_for_matching_pre"):
        _close(out[key]["pred_logits"], ref[key]["pred_logits"], 1e-3)
        _close(out[key]["pred_boxes"], ref[key]["pred_boxes"], 1e-4)
    assert out["dn_meta"] is None


def test_postprocess_matches(fixture, loaded):
    _, _, post, out = loaded
    results = post(out, fixture["inputs"]["target_sizes"])
    assert fixture["postprocess"]["num_select"] == 300
    for mine, ref in zip(results, fixture["postprocess"]["results"]):
        _close(mine["scores"], ref["scores"], 1e-4)
        assert torch.equal(mine["labels"], ref["labels"])
        _close(mine["boxes"], ref["boxes"], 1e-2)  # pixels


def test_every_loss_matches(fixture, loaded):
    criterion = loaded[1]
    train = fixture["train"]
    losses = criterion(train["outputs"], train["targets"])
    assert set(losses) == set(train["losses"])
    for name, expected in train["losses"].items():
        got, expected = float(losses[name]), float(expected)
        assert abs(got - expected) <= 1e-4 * max(abs(expected), 1e-6), f"{name}: {got} vs {expected}"
    assert criterion.weight_dict == train["weight_dict"]


def test_state_dict_is_official_layout(fixture, loaded):
    model = loaded[0]
    exported = dino_core.export_official_state_dict(model)
    assert [k for k, *_ in fixture["keys"]] == list(exported)
