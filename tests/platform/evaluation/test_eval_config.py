"""EvalConfig: `dino eval`, a train config and a pipeline evaluate stage get the same defaults; errors name the field."""
import dataclasses

import pytest

from dino_platform.cli import build_parser, main
from dino_platform.errors import ConfigError
from dino_platform.evaluation.coco_eval import EvalConfig
from dino_platform.pipeline import load_spec
from dino_platform.train.config import load_config

FIELDS = [f.name for f in dataclasses.fields(EvalConfig)]


def pipeline(tmp_path, **evaluate):
    return {"name": "p", "output_root": str(tmp_path), "datasets": {"val": {"shards": str(tmp_path / "val")}},
            "stages": {"evaluate": {"checkpoint": {"uri": "/w.pth"}, "data": "val", **evaluate}}}


def test_every_entry_point_gets_the_eval_config_defaults(tmp_path):
    default = dataclasses.asdict(EvalConfig())
    args = build_parser().parse_args(["eval", "--checkpoint", "c.pth", "--data", "shards"])
    train = load_config({"data": {"train_uri": "/x"}}).eval
    stage = load_spec(pipeline(tmp_path)).stages["evaluate"].eval
    for source in (args, train, stage):
        assert {name: getattr(source, name) for name in FIELDS} == default


@pytest.mark.parametrize("section, message", [
    ({"batch_size": 0}, "eval.batch_size: 0 must be >= 1"),
    ({"detections_per_image": 0}, "eval.detections_per_image: 0 must be >= 1"),
    ({"max_dets": 20, "engine": "pycocotools"}, "eval.max_dets: 20 with engine pycocotools"),
    ({"engine": "detectron2"}, "eval.engine: 'detectron2' is not allowed"),
])
def test_a_bad_value_names_the_field_in_each_entry_point(tmp_path, section, message, capsys):
    with pytest.raises(ConfigError, match=f"config: {message}"):
        load_config({"data": {"train_uri": "/x"}, "eval": section})
    with pytest.raises(ConfigError, match=f"stages.evaluate.{message}"):
        load_spec(pipeline(tmp_path, eval=section))
    flags = [part for key, value in section.items() for part in (f"--{key.replace('_', '-')}", str(value))]
    if "detectron2" in flags:
        return  # argparse refuses a choice outside --engine's before EvalConfig sees it
    assert main(["eval", "--checkpoint", "c.pth", "--data", "shards", *flags]) == 2
    flag_message = "--" + message.removeprefix("eval.").replace("_", "-")  # e.g. --max-dets: 20 with engine ...
    assert f"dino eval: error: {flag_message}" in capsys.readouterr().err


def test_a_protocol_key_beside_the_eval_section_says_where_it_went(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\.evaluate\.max_dets: this key moved to stages\.evaluate\.eval\.max_dets"):
        load_spec(pipeline(tmp_path, max_dets=100))
