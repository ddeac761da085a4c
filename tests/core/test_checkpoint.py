"""Official-checkpoint loading: wrappers, strictness, class transfer, refusing pickled code."""
import logging

import pytest
import torch

import dino_core
from dino_core.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    src, _, _ = dino_core.build_model("dino_tiny", num_classes=91)
    torch.manual_seed(1)
    dst, _, _ = dino_core.build_model("dino_tiny", num_classes=91)
    return src, dst


def test_loads_wrapped_and_module_prefixed(tiny_pair, tmp_path):
    src, dst = tiny_pair
    wrapped = {"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(wrapped, path)
    report = dino_core.load_official_state_dict(dst, str(path))
    assert not report.missing and not report.skipped
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


def test_strict_error_lists_missing_unexpected_misshaped(tiny_pair):
    src, dst = tiny_pair
    sd = dict(src.state_dict())
    sd.pop("transformer.level_embed")
    sd["transformer.not_a_param"] = torch.zeros(1)
    sd["transformer.tgt_embed.weight"] = torch.zeros(7, 64)
    with pytest.raises(CheckpointError) as err:
        dino_core.load_official_state_dict(dst, sd)
    msg = str(err.value)
    assert "missing 1" in msg and "transformer.level_embed" in msg
    assert "unexpected 1" in msg and "transformer.not_a_param" in msg
    assert "mis-shaped 1" in msg and "tgt_embed" in msg


def test_different_num_classes_reinitialises_class_heads(tiny_pair, caplog):
    src, _ = tiny_pair
    dst, _, _ = dino_core.build_model("dino_tiny", num_classes=5)
    before = dst.class_embed[0].weight.clone()
    with caplog.at_level(logging.INFO, logger="dino_core.checkpoint"):
        report = dino_core.load_official_state_dict(dst, src.state_dict())
    assert "class_embed.0.weight" in report.reinitialized and "label_enc.weight" in report.reinitialized
    assert torch.equal(dst.class_embed[0].weight, before)
    assert torch.equal(dst.transformer.tgt_embed.weight, src.transformer.tgt_embed.weight)
    assert any("re-initialised" in r.getMessage() for r in caplog.records)


def test_class_map_copies_mapped_rows(tiny_pair):
    src, _ = tiny_pair
    dst, _, _ = dino_core.build_model("dino_tiny", num_classes=4)
    fresh = dst.class_embed[0].weight.clone()
    class_map = {17: 1, 44: 3}  # e.g. Objects365 ids -> COCO ids
    report = dino_core.load_official_state_dict(dst, src.state_dict(), class_map=class_map)
    assert "class_embed.0.weight" in report.remapped
    w = dst.class_embed[0].weight
    assert torch.equal(w[1], src.class_embed[0].weight[17]) and torch.equal(w[3], src.class_embed[0].weight[44])
    assert torch.equal(w[0], fresh[0]) and torch.equal(w[2], fresh[2])  # unmapped rows re-initialised
    assert torch.equal(dst.label_enc.weight[3], src.label_enc.weight[44])
    assert torch.equal(dst.transformer.enc_out_class_embed.bias[1], src.transformer.enc_out_class_embed.bias[17])
    with pytest.raises(CheckpointError, match="out of range"):
        dino_core.load_official_state_dict(dst, src.state_dict(), class_map={1000: 1})


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Evil()}, path)
    model, _, _ = dino_core.build_model("dino_tiny", num_classes=91)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        dino_core.load_official_state_dict(model, str(path))
    assert "this must never run" not in capsys.readouterr().out


def test_missing_file_names_the_path(tmp_path):
    model, _, _ = dino_core.build_model("dino_tiny", num_classes=91)
    with pytest.raises(CheckpointError, match="nope.pth"):
        dino_core.load_official_state_dict(model, str(tmp_path / "nope.pth"))
