"""Pipeline specs: validation errors that name the field and fail before any work, fingerprints,
the skip/re-run rules, the registry's champion rule, class transfer at init, and ``dino predict``.

Real parts throughout: YAML specs from ``pipelines/``, real shards from ``dino synth`` + ``dino
ingest``, a real SQLite MLflow registry, a real (session) Ray instance for the resource check.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dino_platform.errors import ConfigError, DataError
from support import REPO

SPEC = REPO / "pipelines" / "o365_pretrain_coco_ft.yaml"


def smoke(tmp_path, *overrides, preset="smoke"):
    from dino_platform.pipeline import load_spec

    return load_spec(SPEC, preset=preset, overrides=[f"output_root={tmp_path / 'out'}", *overrides])


def run_entry(tmp_path, *args) -> int:
    from dino_platform.pipeline.entry import main

    return main(["--spec", str(SPEC), "--preset", "smoke", "--set", f"output_root={tmp_path / 'out'}", *args])


# ---------------------------------------------------------------------------------------------
# validation: every error names the field, and nothing has been written when it is raised


@pytest.mark.parametrize("override, message", [
    ("stages.pretrain.config.optim.lrr=0.1",
     r"unknown field stages\.pretrain\.config\.optim\.lrr; .*did you mean stages\.pretrain\.config\.optim\.lr\?"),
    ("stages.finetune.confg={optim: {lr: 0.1}}",
     r"unknown field stages\.finetune\.confg; .*did you mean stages\.finetune\.config\?"),
    ("datasets.coco_val.annotation=x.json",
     r"unknown field datasets\.coco_val\.annotation; .*did you mean datasets\.coco_val\.annotations\?"),
    ("output_rot=/tmp/x", r"unknown field output_rot \(did you mean output_root\?\)"),
])
def test_typo_in_a_field_name_is_named_with_a_suggestion(tmp_path, capsys, override, message):
    with pytest.raises(ConfigError, match=message):
        smoke(tmp_path, override)
    assert run_entry(tmp_path, "--set", override) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # failed before any work


@pytest.mark.parametrize("override, message", [
    ("stages.finetune.train_data=coco_trian",
     r"stages\.finetune\.train_data: no dataset named 'coco_trian' \(did you mean coco_train\?\)"),
    ("stages.ingest.datasets=[o365_train, coco_val]",
     r"stages\.finetune\.train_data: dataset coco_train is raw data that no earlier ingest stage lists"),
    ("datasets.coco_val.synth=null",
     r"datasets\.coco_val: no data; give annotations \+ images"),
    ("datasets.coco_val.images=null",
     r"datasets\.coco_val: give either synth or annotations \+ images|datasets\.coco_val\.images: required"),
])
def test_missing_dataset_is_named(tmp_path, override, message):
    spec_overrides = [override]
    if override == "datasets.coco_val.images=null":
        spec_overrides = ["datasets.coco_val.synth=null", "datasets.coco_val.annotations=a.json"]
    with pytest.raises(ConfigError, match=message):
        smoke(tmp_path, *spec_overrides)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, message", [
    ("stages.evaluate.checkpoint.stage=finetun",
     r"stages\.evaluate\.checkpoint\.stage: reads checkpoint from 'finetun', but no earlier stage is named so "
     r"\(did you mean finetune\?\); earlier stages producing checkpoint: pretrain, finetune"),
    ("stages.finetune.init.stage=evaluate",  # declared, but only after finetune
     r"stages\.finetune\.init\.stage: reads checkpoint from 'evaluate', but no earlier stage is named so"),
    ("stages.register.evaluation=finetune",
     r"stages\.register\.evaluation: reads metrics from 'finetune', but finetune is a train stage, which "
     r"produces checkpoint; earlier stages producing metrics: evaluate"),
    ("stages.predict.model={stage: ingest}",
     r"stages\.predict\.model\.stage: reads model or checkpoint from 'ingest', but ingest is a ingest stage"),
    ("stages.evaluate.checkpoint={stage: finetune, uri: /x.pth}",
     r"stages\.evaluate\.checkpoint: give exactly one of stage .* got stage, uri"),
])
def test_a_stage_reading_an_output_no_earlier_stage_produces_is_rejected(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        smoke(tmp_path, override)


@pytest.mark.parametrize("override, message", [
    ("stages.pretrain.config.model.preset=dino_swinl_4scal",
     r"stages\.pretrain\.config\.model\.preset: .dino_swinl_4scal. is not a dino_core preset \(did you mean "
     r"dino_swinl_4scale\?\)"),
    ("stages.finetune.init.class_map=o365_to_cooc", r"stages\.finetune\.init\.class_map: 'o365_to_cooc' is not a "
                                                    r"shipped class map \(did you mean o365_to_coco\?\)"),
    ("stages.pretrain.config.model.overrides={hidden_dm: 64}",
     r"stages\.pretrain\.config\.model\.overrides: unknown model config"),
    ("stages.pretrain.config.deepspeed.zero_stage=4", r"stages\.pretrain\.config\.deepspeed\.zero_stage: 4 is not allowed"),
    ("stages.pretrain.config.scaling.use_gpu=2", r"stages\.pretrain\.config\.scaling\.use_gpu: expected true or false"),
    ("stages.pretrain.config.deepspeed.precision=fp16", r"stages\.pretrain\.config\.deepspeed\.precision: fp16 needs"),
    ("stages.evaluate.resources.gpus_per_worker=2", r"stages\.evaluate\.resources\.gpus_per_worker: 2 must be 0 or 1"),
    # the pipeline dialect before the train stage embedded a `dino train` config
    ("stages.pretrain.schedule={lr: 0.1}", r"stages\.pretrain\.schedule: this key moved to stages\.pretrain\.config\.optim"),
    ("stages.pretrain.config.data.train_uri=/x", r"stages\.pretrain\.config\.data\.train_uri: set by the pipeline"),
    ("stages.ingest.kind=injest", r"stages\.ingest\.kind: 'injest' is not a stage kind \(did you mean ingest\?\)"),
    ("stages.register.alias=latest", r"stages\.register\.alias: 'latest' must be a name like champion"),
])
def test_bad_names_and_values_are_named(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        smoke(tmp_path, override)


def test_unknown_preset_is_named(tmp_path, capsys):
    from dino_platform.pipeline.entry import main

    assert main(["--spec", str(SPEC), "--preset", "smok"]) == 2
    assert "--preset smok: no such preset (did you mean smoke?); available: smoke" in capsys.readouterr().err


def test_a_stage_declared_twice_is_an_error_not_silently_dropped(tmp_path):
    from dino_platform.pipeline import load_spec

    text = SPEC.read_text().replace("  evaluate:\n", "  finetune:\n    kind: train\n    train_data: coco_train\n"
                                                   "  evaluate:\n", 1)
    (tmp_path / "twice.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"twice\.yaml: not valid YAML \(duplicate key 'finetune'"):
        load_spec(tmp_path / "twice.yaml", preset="smoke")


def test_shipped_specs_are_valid(monkeypatch):
    from dino_platform.pipeline import load_spec
    from dino_platform.pipeline.stages.train import train_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # the real specs write to S3
    for path in [REPO / "pipelines" / f"{n}.yaml" for n in ("o365_pretrain_coco_ft", "coco_finetune", "coco_eval")]:
        for preset in (None, "smoke"):
            spec = load_spec(path, preset=preset)
            assert spec.stages, path
    spec = load_spec(SPEC)
    assert train_config(spec, "pretrain").model.preset == "dino_swinl_4scale"
    assert train_config(spec, "pretrain").model.num_classes == 366
    assert train_config(spec, "finetune").model.init_class_map  # Objects365 -> COCO rows


def test_s3_output_without_a_reachable_tracking_store_is_rejected(monkeypatch):
    from dino_platform.pipeline import load_spec

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=r"tracking\.uri: required when output_root .* is not local"):
        load_spec(SPEC)


def test_overrides_and_presets_merge_as_documented(tmp_path):
    from dino_platform.pipeline.stages.train import train_config

    spec = smoke(tmp_path, "stages.finetune.config.optim.max_steps=3", "stages.pretrain.config.scaling.num_workers=1")
    assert train_config(spec, "finetune").optim.max_steps == 3
    assert train_config(spec, "pretrain").scaling.num_workers == 1
    # the preset replaced the raw sources by synthetic ones and kept the rest of the dataset entry
    assert spec.datasets["o365_train"].synth.kind == "o365" and spec.datasets["o365_train"].annotations is None
    assert spec.datasets["o365_train"].format == "o365"
    assert list(spec.stages) == ["ingest", "pretrain", "finetune", "evaluate", "register", "predict"]


# ---------------------------------------------------------------------------------------------
# resources: checked against the cluster before any work


def test_impossible_resources_fail_before_any_work(tmp_path, ray_local):
    """4 workers x 1 CPU on the 2-CPU session cluster: refused by the preflight, nothing written."""
    from dino_platform.pipeline.runner import run_pipeline

    spec = smoke(tmp_path, "stages.finetune.config.scaling.num_workers=4",
                 "stages.finetune.config.scaling.cpus_per_worker=1")
    with pytest.raises(ConfigError, match=r"stages\.finetune\.config\.scaling: 4 workers x 1 CPU = 4 CPU, but the cluster "
                                          r"has 2 \(ray\.cluster_resources\(\)\)"):
        run_pipeline(spec)
    assert not (tmp_path / "out").exists()

    spec = smoke(tmp_path, "stages.evaluate.resources.gpus_per_worker=1")
    with pytest.raises(ConfigError, match=r"stages\.evaluate\.resources: 1 workers x 1 GPU = 1 GPU, but the cluster "
                                          r"has 0"):
        run_pipeline(spec)
    assert not (tmp_path / "out").exists()


def test_missing_data_fails_before_any_work(tmp_path, ray_local):
    """Shards that are not there, raw annotations that are not there: refused by the preflight."""
    from dino_platform.pipeline.preflight import check_inputs
    from dino_platform.pipeline.runner import run_pipeline

    not_ingested = ["stages.ingest.datasets=[o365_train, coco_train]",
                    f"datasets.coco_val={{format: coco, shards: {tmp_path / 'nowhere'}}}"]
    with pytest.raises(DataError, match=r"datasets\.coco_val: missing dataset: .*no manifest"):
        run_pipeline(smoke(tmp_path, *not_ingested))
    assert not (tmp_path / "out").exists()
    raw = [f"datasets.coco_val={{format: coco, annotations: {tmp_path / 'a.json'}, images: {tmp_path / 'img'}}}"]
    with pytest.raises(DataError, match=r"datasets\.coco_val\.annotations: missing dataset: .*a\.json does not "
                                        r"exist"):
        check_inputs(smoke(tmp_path, *raw))
    assert not (tmp_path / "out").exists()


def test_resource_rules(tmp_path):
    from dino_platform.pipeline.preflight import check_resources

    spec = smoke(tmp_path)  # 2 workers x 0.5 CPU per train stage
    check_resources(spec, {"CPU": 2.0}, [{"CPU": 2.0}], None)
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.config\.scaling: 2 workers x 0.5 CPU leave 0.5 of the "
                                          r"cluster's 1.5 CPUs for Ray Data"):
        check_resources(spec, {"CPU": 1.5}, [{"CPU": 1.5}], None)
    big = smoke(tmp_path, "stages.pretrain.config.scaling={num_workers: 16, cpus_per_worker: 16, use_gpu: true}")
    # a launcher cluster with no GPU node up yet, but up to 8 nodes x 8 GPUs: fine
    check_resources(big, {"CPU": 0.0}, [{"CPU": 0.0}], {"CPU": 1536.0, "GPU": 64.0})
    with pytest.raises(ConfigError, match=r"16 workers x 1 GPU = 16 GPU, but the cluster has 8 \(the autoscaler's"):
        check_resources(big, {"CPU": 0.0}, [{"CPU": 0.0}], {"CPU": 1536.0, "GPU": 8.0})
    # enough in total, but no single node can hold one worker
    with pytest.raises(ConfigError, match=r"one worker needs 16 CPU but the largest node has 8"):
        check_resources(big, {"CPU": 512.0, "GPU": 16.0}, [{"CPU": 8.0, "GPU": 1.0}] * 64, None)


# ---------------------------------------------------------------------------------------------
# fingerprints, skipping and re-running (real shards, no Ray)


def _context(spec):
    from dino_platform.pipeline.context import StageContext
    from dino_platform.pipeline.state import PipelineState

    return StageContext(spec=spec, state=PipelineState(spec.state_uri, spec.name),
                        tracking_uri=f"sqlite:///{Path(spec.output_root) / 'mlflow.db'}", git_commit="test")


def _ingest(spec):
    """Run the spec's ingest stage through the runner's stage loop; returns this run's actions."""
    from dino_platform.pipeline.runner import _run_stage

    ctx = _context(spec)
    ctx.state.begin_run(preset="test")
    _run_stage(ctx, "ingest", spec.stages["ingest"])
    ctx.state.end_run("done")
    return ctx, ctx.state.run["actions"]


@pytest.fixture
def tiny(tmp_path):
    """The smoke spec shrunk to 4/4/2 images; its ingest stage already run."""
    overrides = ["stages.ingest.parallel=false", "datasets.o365_train.synth.images=4",
                 "datasets.coco_train.synth.images=4", "datasets.coco_val.synth.images=2"]
    spec = smoke(tmp_path, *overrides)
    _ingest(spec)
    return tmp_path, overrides


def test_ingest_runs_once_then_skips_and_redoes_missing_shards(tiny):
    tmp_path, overrides = tiny
    spec = smoke(tmp_path, *overrides)
    _, actions = _ingest(spec)
    assert actions["ingest"]["action"] == "skipped"
    shard = next((tmp_path / "out" / "shards" / "coco_val").glob("shard-*.parquet"))
    shard.unlink()
    _, actions = _ingest(spec)
    assert actions["ingest"]["action"] == "ran" and actions["ingest"]["reason"] == "its outputs are gone"
    assert actions["ingest"]["ingested"] == ["coco_val"]  # the others were complete and left alone
    state = json.loads((tmp_path / "out" / "pipeline_state.json").read_text())
    assert [r["actions"]["ingest"]["action"] for r in state["runs"]] == ["ran", "skipped", "ran"]


def test_fingerprints_follow_config_and_data(tiny):
    from dino_platform.pipeline.stages.evaluate import KIND as EVALUATE
    from dino_platform.pipeline.stages.train import KIND as TRAIN

    tmp_path, overrides = tiny

    def train_fp(*extra, stage="pretrain"):
        spec = smoke(tmp_path, *overrides, *extra)
        ctx = _context(spec)
        return TRAIN.fingerprint(ctx, stage, spec.stages[stage])

    base = train_fp()
    assert train_fp() == base
    assert train_fp("stages.pretrain.config.optim.lr=1.0e-3") != base
    assert train_fp("stages.pretrain.config.scaling.num_workers=1") != base  # the total batch changes the result
    assert train_fp("stages.pretrain.config.data.transform={scale: 0.25}") != base
    # where logs go and how often failures are retried do not change what is trained
    assert train_fp("stages.pretrain.config.run.max_failures=3") == base
    assert train_fp("tracking.experiment=elsewhere") == base

    # downstream stages change with their upstream stage's fingerprint
    spec = smoke(tmp_path, *overrides)
    ctx = _context(spec)
    ctx.fingerprints["pretrain"] = base
    ctx.fingerprints["finetune"] = ft = TRAIN.fingerprint(ctx, "finetune", spec.stages["finetune"])
    ev = EVALUATE.fingerprint(ctx, "evaluate", spec.stages["evaluate"])
    ctx.fingerprints["pretrain"] = train_fp("stages.pretrain.config.optim.lr=1.0e-3")
    assert TRAIN.fingerprint(ctx, "finetune", spec.stages["finetune"]) != ft
    ctx.fingerprints["finetune"] = "something else"
    assert EVALUATE.fingerprint(ctx, "evaluate", spec.stages["evaluate"]) != ev

    # different data under the same name: a new digest, a new fingerprint
    changed = [*overrides, "datasets.o365_train.synth.seed=5"]
    _ingest(smoke(tmp_path, *changed))
    assert train_fp("datasets.o365_train.synth.seed=5") != base


# ---------------------------------------------------------------------------------------------
# class transfer at init, registry, predict (real SQLite MLflow)


def _tiny_checkpoint(directory: Path, num_classes: int, seed: int = 0, transform=None) -> str:
    """A platform checkpoint directory (a model artifact: model.pt + model_config.json) of a random dino_tiny."""
    import dino_core
    import torch

    from dino_platform.model.artifact import write_artifact
    from dino_platform.model.config import ModelConfig

    torch.manual_seed(seed)
    model, _, _ = dino_core.build_model("dino_tiny", num_classes=num_classes)
    directory.mkdir(parents=True)
    write_artifact(directory, dino_core.export_official_state_dict(model),
                   ModelConfig(preset="dino_tiny", num_classes=num_classes), transform or {"scale": 0.2}, {})
    return str(directory)


def test_init_weights_transfers_the_objects365_head_to_coco(tmp_path):
    import dino_core
    import torch

    from dino_platform.data.categories import o365_to_coco_ids
    from dino_platform.pipeline.stages.train import train_config
    from dino_platform.storage import resolve
    from dino_platform.train.engine import init_weights

    checkpoint = _tiny_checkpoint(tmp_path / "o365", num_classes=366)
    spec = smoke(tmp_path, f"stages.finetune.init={{uri: {checkpoint}, class_map: o365_to_coco}}")
    model_cfg = train_config(spec, "finetune", init_from=checkpoint).model
    assert model_cfg.init_class_map == o365_to_coco_ids()
    model, _, _ = dino_core.build_model("dino_tiny", num_classes=91)
    fresh = model.class_embed[0].weight.detach().clone()
    init_weights(model, model_cfg, resolve(checkpoint + "/model.pt"))
    source = torch.load(Path(checkpoint) / "model.pt", weights_only=True)["class_embed.0.weight"]
    mapping = o365_to_coco_ids()
    person_o365 = next(o for o, c in mapping.items() if c == 1)
    car_o365 = next(o for o, c in mapping.items() if c == 3)
    assert torch.equal(model.class_embed[0].weight[1], source[person_o365])
    assert torch.equal(model.class_embed[0].weight[3], source[car_o365])
    unmapped = sorted(set(range(91)) - set(mapping.values()))
    assert torch.equal(model.class_embed[0].weight[unmapped[0]], fresh[unmapped[0]])  # re-initialised row


@pytest.fixture
def registry(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("test", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, experiment


def _artifact(checkpoint, transform, categories):
    from dataclasses import replace

    from dino_platform.model.artifact import load_artifact

    return replace(load_artifact(checkpoint), transform=transform, categories=categories)


def _register(uri, client, experiment, checkpoint, ap):
    from dino_platform.registry.models import register_evaluated

    run = client.create_run(experiment).info.run_id
    return run, register_evaluated(uri, "dino-coco", "champion", run,
                                   _artifact(checkpoint, {"scale": 0.2}, {1: "person", 3: "car"}),
                                   {"AP": ap, "AP50": ap * 2},
                                   {"data_digest.coco_val": "abc", "parent_run.finetune": "r1", "git_commit": "deadbeef"})


def test_champion_moves_only_to_a_higher_ap(tmp_path, registry):
    uri, client, experiment = registry
    checkpoint = _tiny_checkpoint(tmp_path / "ckpt", num_classes=91)
    _, first = _register(uri, client, experiment, checkpoint, 0.30)
    assert (first.version, first.promoted, first.champion_version) == ("1", True, "1")
    _, worse = _register(uri, client, experiment, checkpoint, 0.25)
    assert (worse.version, worse.promoted, worse.champion_version) == ("2", False, "1")
    assert "does not beat version 1's AP 0.3000" in worse.decision
    run, better = _register(uri, client, experiment, checkpoint, 0.35)
    assert (better.version, better.promoted) == ("3", True)
    assert str(client.get_model_version_by_alias("dino-coco", "champion").version) == "3"
    version = client.get_model_version("dino-coco", "2")
    assert version.tags["AP"] == "0.25" and version.tags["AP50"] == "0.5"
    assert version.tags["data_digest.coco_val"] == "abc" and version.tags["parent_run.finetune"] == "r1"
    assert version.tags["git_commit"] == "deadbeef" and "champion_decision" in version.tags
    assert client.get_run(run).data.tags["registry.champion_decision"] == better.decision
    # the same evaluation registered again is the same version, not a new one
    from dino_platform.registry.models import register_evaluated

    again = register_evaluated(uri, "dino-coco", "champion", run, _artifact(checkpoint, {}, {}),
                               {"AP": 0.35, "AP50": 0.7}, {})
    assert again.version == "3" and "already holds @champion" in again.decision


def test_registered_model_loads_offline_without_pickled_code(tmp_path, registry):
    import torch

    from dino_platform.registry.models import download_model

    uri, client, experiment = registry
    checkpoint = _tiny_checkpoint(tmp_path / "ckpt", num_classes=91)
    _register(uri, client, experiment, checkpoint, 0.1)
    directory = download_model("models:/dino-coco@champion", uri, str(tmp_path / "dl"))
    weights = torch.load(directory / "model.pt", weights_only=True)
    original = torch.load(Path(checkpoint) / "model.pt", weights_only=True)
    assert weights.keys() == original.keys() and all(torch.equal(weights[k], original[k]) for k in weights)
    config = json.loads((directory / "model_config.json").read_text())
    assert (config["preset"], config["num_classes"], config["categories"]["3"]) == ("dino_tiny", 91, "car")


def test_dino_predict_writes_pngs_and_json(tmp_path, registry, monkeypatch, capsys):
    from PIL import Image

    from dino_platform.cli import main
    from dino_platform.data.categories import coco_categories
    from dino_platform.data.synth import SynthConfig, generate

    uri, client, experiment = registry
    checkpoint = _tiny_checkpoint(tmp_path / "ckpt", num_classes=91)
    _register(uri, client, experiment, checkpoint, 0.1)
    generate(SynthConfig(kind="coco", images=2, seed=3, size=(160, 120)), str(tmp_path / "raw"))
    images = sorted(str(p) for p in (tmp_path / "raw" / "images").rglob("*.jpg"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "pred"
    assert main(["predict", "--model", "models:/dino-coco@champion", *images, "--out", str(out),
                 "--threshold", "0.0", "--max-detections", "5"]) == 0
    document = json.loads((out / "detections.json").read_text())
    assert len(document["images"]) == 2
    for item, path in zip(document["images"], images):
        png = Image.open(item["png"])
        # a picture this small is drawn enlarged by a whole factor (boxes stay in original pixels)
        width, height = Image.open(path).size
        assert item["png_scale"] == -(-480 // min(width, height)) > 1
        assert png.format == "PNG" and png.size == (width * item["png_scale"], height * item["png_scale"])
        assert len(item["detections"]) == 5 and all(d["drawn"] for d in item["detections"])
        for d in item["detections"]:
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 <= x1 <= item["width"] + 1e-3 and 0 <= y0 <= y1 <= item["height"] + 1e-3
    # the same weights given as a checkpoint directory predict the same boxes
    assert main(["predict", "--model", checkpoint, images[0], "--out", str(tmp_path / "pred2"),
                 "--max-detections", "5"]) == 0
    direct = json.loads((tmp_path / "pred2" / "detections.json").read_text())

    def boxes(item):
        return [(d["label"], d["score"], d["box"]) for d in item["detections"]]

    assert boxes(direct["images"][0]) == boxes(document["images"][0])
    # names: the registered version carries its dataset's (here two); a bare checkpoint of a 91-class
    # head falls back to the COCO names
    assert {d["name"] for d in direct["images"][0]["detections"]} <= set(coco_categories().values())
    # a registry URI naming nothing is one clear line
    assert main(["predict", "--model", "models:/dino-coco@nope", images[0]]) == 2
    assert "models:/dino-coco@nope is not in the registry" in capsys.readouterr().err
