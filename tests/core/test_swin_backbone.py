"""The Swin backbone computes what the official DINO Swin backbone computes, and Swin-L checkpoints
in the official layout load, export and re-load exactly (fixtures: ``tests/fixtures/swin_parity``)."""
import json

import pytest
import torch
from torch import nn

import dino_core
from dino_core.backbone import Backbone, SwinBackbone
from dino_core.checkpoint import export_official_state_dict, load_official_state_dict, swin_timm_to_official
from support import FIXTURES
from support.parity import official_state_dict

FIXTURE_DIR = FIXTURES / "swin_parity"
ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    return torch.load(FIXTURE_DIR / "swin_tiny.pt", weights_only=True)


@pytest.fixture(scope="module")
def tiny_official(tiny):
    """The official-layout state dict the fixture was computed with (rebuilt from the fill rule)."""
    return official_state_dict(tiny)


def _tiny_shell(fixture, official, out_indices):
    """A module whose only child is ``backbone`` (``backbone.0`` = Swin-T), loaded from the fixture."""
    shell = nn.Module()
    shell.backbone = Backbone(SwinBackbone(fixture["timm_name"], out_indices), hidden_dim=256)
    unused_norms = tuple(f"backbone.0.norm{i}." for i in set(range(4)) - set(out_indices))
    report = load_official_state_dict(shell, {"model": {k: v for k, v in official.items()
                                                        if not k.startswith(unused_norms)}})
    assert not report.missing and not report.skipped and not report.reinitialized
    return shell.eval()


@pytest.fixture(scope="module")
def tiny_all_stages(tiny, tiny_official):
    return _tiny_shell(tiny, tiny_official, (0, 1, 2, 3))


def _assert_stages_match(fixture, shell, out_indices):
    for case in fixture["cases"]:
        with torch.no_grad():
            maps = shell.backbone.body(case["images"].float(), case["mask"])
        assert len(maps) == len(out_indices)
        for (feature, mask), stage in zip(maps, out_indices):
            want = case["features"][stage]
            assert feature.shape == want.shape, (case["name"], stage)
            err = (feature - want).abs().max().item()
            assert err <= ATOL, f"{case['name']} stage {stage}: max abs error {err} > {ATOL}"
            assert torch.equal(mask, case["masks"][stage]), (case["name"], stage)


def test_swin_tiny_matches_official_stage_by_stage(tiny, tiny_all_stages):
    assert tiny["official_config"]["out_indices"] == [0, 1, 2, 3]
    _assert_stages_match(tiny, tiny_all_stages, (0, 1, 2, 3))


def test_swin_tiny_three_stages_match_official(tiny, tiny_official):
    """The 4-scale layout (stages 1-3, no ``norm0``) loads strictly and computes the same maps."""
    _assert_stages_match(tiny, _tiny_shell(tiny, tiny_official, (1, 2, 3)), (1, 2, 3))


def test_swin_tiny_export_restores_the_official_state_dict(tiny, tiny_official, tiny_all_stages):
    exported = swin_timm_to_official(tiny_all_stages.state_dict(), tiny_all_stages)
    assert set(exported) == set(tiny_official)
    index = tiny["relative_position_index"]["7"].long()
    for key, shape, _, dtype in tiny["keys"]:
        value = exported[key]
        assert list(value.shape) == shape and str(value.dtype) == f"torch.{dtype}", key
        if key.endswith("relative_position_index"):
            assert torch.equal(value, index), key
        else:
            assert torch.equal(value, tiny_official[key]), key


# --- Swin-L detector presets: the official key layout, end to end (195 M backbone parameters) ---

@pytest.fixture(scope="module")
def swinl_official_keys():
    with open(FIXTURE_DIR / "official_swinl_keys.json") as fh:
        return json.load(fh)


def _constant_official_state_dict(keys, relative_position_index):
    """Each float tensor = one constant per shared tensor (a zero-stride view): catches any key mix-up."""
    number, out = {}, {}
    for key, shape, dtype, canonical in keys:
        if dtype.startswith("float"):
            out[key] = torch.tensor(float(number.setdefault(canonical, len(number) + 1))).expand(shape)
        else:
            assert key.endswith("relative_position_index"), key
            out[key] = relative_position_index
    return out


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["dino_swinl_4scale", "dino_swinl_5scale"])
def test_swinl_official_layout_loads_exports_and_reloads(preset, swinl_official_keys, tiny):
    keys = swinl_official_keys[preset]["keys"]
    model, _, _ = dino_core.build_model(preset)

    # export: exactly the official key set, shapes, dtypes and relative position indices
    initial = {k: v.clone() for k, v in export_official_state_dict(model).items()}
    assert sorted([k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in initial.items()) == \
        sorted(k[:3] for k in keys)
    index12 = tiny["relative_position_index"]["12"].long()
    for key, *_ in keys:
        if key.endswith("relative_position_index"):
            assert torch.equal(initial[key], index12), key

    # a checkpoint with exactly the official entries loads strictly, each tensor where it belongs
    constants = _constant_official_state_dict(keys, index12)
    report = load_official_state_dict(model, {"model": constants}, strict=True)
    assert not report.missing and not report.skipped and not report.reinitialized
    # the stage-0 patch merging lives in timm's stage 1
    assert torch.equal(model.backbone.body.layers[1].downsample.reduction.weight,
                       constants["backbone.0.layers.0.downsample.reduction.weight"])
    exported = export_official_state_dict(model)
    assert set(exported) == set(constants)
    for key, value in constants.items():
        assert torch.equal(exported[key], value), key

    # and the first export loads back strictly, value for value
    load_official_state_dict(model, initial, strict=True)
    for key, value in export_official_state_dict(model).items():
        assert torch.equal(value, initial[key]), key
