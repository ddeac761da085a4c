"""TrainConfig: official defaults, YAML loading, errors that name the field, DeepSpeed config, no secrets."""
import pytest

from dino_platform.errors import ConfigError
from dino_platform.train.config import TrainConfig, flat_params, load_config
from dino_platform.train.deepspeed_config import build_deepspeed_config

MINIMAL = {"data": {"train_uri": "s3://bucket/train"}}


def test_defaults_are_the_official_recipe():
    cfg = load_config(MINIMAL)
    assert (cfg.optim.lr, cfg.optim.lr_backbone, cfg.optim.weight_decay) == (1e-4, 1e-5, 1e-4)
    assert cfg.optim.clip_max_norm == 0.1 and cfg.optim.lr_linear_proj_mult == 0.1
    assert (cfg.optim.epochs, cfg.optim.lr_drop) == (12, 11)


def test_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "data: {train_uri: /data/train, eval_uri: /data/val}\n"
        "scaling: {num_workers: 4, batch_size_per_worker: 2, accumulation_steps: 3}\n"
        "deepspeed: {zero_stage: 3}\n"
        "optim: {lr: 2e-4}\n"
        "model: {init_class_map: {1: 5, 2: 7}}\n"
    )
    cfg = load_config(path, overrides=["deepspeed.precision=bf16", "run.name=exp-1"])
    assert cfg.total_batch_size == 24
    assert cfg.optim.lr == 2e-4  # YAML reads "2e-4" as a string; the loader takes it as a number
    assert cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.precision == "bf16"
    assert cfg.model.init_class_map == {1: 5, 2: 7}
    assert cfg.run.name == "exp-1"
    assert load_config(cfg.to_dict()) == cfg  # round trip


@pytest.mark.parametrize("section, value, message", [
    ({"deepspeed": {"zero_stage": 4}}, None, r"deepspeed.zero_stage: 4 is not allowed; choose one of 0, 1, 2, 3"),
    ({"deepspeed": {"precision": "fp8"}}, None, r"deepspeed.precision: 'fp8' is not allowed; choose one of fp32, bf16, fp16"),
    ({"optim": {"lr": -1}}, None, r"optim.lr: -1.0 must be > 0"),
    ({"optim": {"lrr": 1}}, None, r"unknown field optim.lrr; allowed: lr, lr_backbone"),
    ({"scaling": {"num_workers": "two"}}, None, r"scaling.num_workers: 'two' is not an integer or a list \[min, max\]"),
    ({"scaling": {"num_workers": [3, 1]}}, None, r"scaling.num_workers: \[3, 1\] must be an integer or \[min, max\]"),
    ({"scaling": {"num_workers": [0, 2]}}, None, r"scaling.num_workers\[0\] \(min\): 0 must be > 0"),
    ({"scaling": {"placement_strategy": "SPREADED"}}, None, r"scaling.placement_strategy: 'SPREADED' is not allowed"),
    ({"scaling": {"resources_per_worker": {"GPU": 1}}}, None, r"scaling.resources_per_worker.GPU: set scaling"),
    ({"deepspeed": {"precision": "fp16"}}, None, r"fp16 needs scaling.use_gpu"),
    ({"run": {"name": "a/b"}}, None, r"run.name"),
])
def test_bad_values_name_the_field_and_allowed_values(section, value, message):
    raw = {**MINIMAL, **section}
    with pytest.raises(ConfigError, match=message):
        load_config(raw)


def test_missing_train_uri_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="data.train_uri: required"):
        load_config({})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_key_given_twice_is_an_error_in_configs_and_sweep_specs(tmp_path):
    """PyYAML keeps the last of two equal keys; a whole `optim:` section would vanish silently."""
    from dino_platform.sweep.spec import load_sweep_spec

    path = tmp_path / "job.yaml"
    path.write_text("data: {train_uri: s3://b/t}\noptim: {lr: 1.0e-3}\noptim: {epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"job\.yaml: not valid YAML \(duplicate key 'optim'"):
        load_config(path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: s\nname: t\n")
    with pytest.raises(ConfigError, match=r"sweep\.yaml: not valid YAML \(duplicate key 'name'"):
        load_sweep_spec(sweep)


def test_overrides_leave_the_callers_dict_alone_and_reject_a_bad_item():
    raw = {"data": {"train_uri": "s3://b/t"}, "optim": {"lr": 1e-3}}
    cfg = load_config(raw, overrides=["optim.lr=5e-4", "optim.epochs=3"])
    assert (cfg.optim.lr, cfg.optim.epochs) == (5e-4, 3) and raw["optim"] == {"lr": 1e-3}
    with pytest.raises(ConfigError, match=r"--set 'optim\.lr': expected dotted\.key=value, e\.g\. optim\.lr=2e-4"):
        load_config(raw, overrides=["optim.lr"])
    with pytest.raises(ConfigError, match=r"--set 'optim\.lr\.x=1': optim\.lr is not a mapping"):
        load_config(raw, overrides=["optim.lr.x=1"])


def test_deepspeed_config_follows_the_typed_config():
    cfg = load_config({**MINIMAL, "scaling": {"num_workers": 2, "batch_size_per_worker": 3, "accumulation_steps": 2},
                       "deepspeed": {"zero_stage": 1, "precision": "bf16"}})
    ds = build_deepspeed_config(cfg)
    assert ds["train_batch_size"] == 12 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.1
    assert ds["zero_optimization"]["stage"] == 1
    # mixed precision is autocast over fp32 master parameters, never DeepSpeed's parameter cast
    assert "bf16" not in ds and "fp16" not in ds
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert ds["zero_optimization"]["reduce_bucket_size"] == ds["zero_optimization"]["allgather_bucket_size"] == 5e7
    assert "torch_autocast" not in build_deepspeed_config(load_config(MINIMAL))
    custom = load_config({**MINIMAL, "deepspeed": {"bucket_size": 20_000_000}})
    assert build_deepspeed_config(custom)["zero_optimization"]["reduce_bucket_size"] == 20_000_000
    with pytest.raises(ConfigError, match="deepspeed.bucket_size"):
        load_config({**MINIMAL, "deepspeed": {"bucket_size": 0}})


def test_elastic_range_keeps_the_total_batch_with_accumulation():
    cfg = load_config({**MINIMAL, "scaling": {"num_workers": [1, 4], "batch_size_per_worker": 1,
                                              "accumulation_steps": 3, "placement_strategy": "STRICT_SPREAD"}})
    assert cfg.scaling.elastic and cfg.scaling.keeps_total_batch  # the default for a range
    assert cfg.total_batch_size == 12  # at max workers
    for world_size, accumulation in ((1, 12), (2, 6), (3, 4), (4, 3)):
        at = cfg.at_world_size(world_size)
        assert at.scaling.num_workers == world_size and at.scaling.accumulation_steps == accumulation
        assert at.total_batch_size == 12
        ds = build_deepspeed_config(at)
        assert ds["train_batch_size"] == 12 and ds["gradient_accumulation_steps"] == accumulation
    # a fixed size, or keep_total_batch: false, keeps the configured accumulation at every size
    loose = load_config({**MINIMAL, "scaling": {"num_workers": [1, 4], "keep_total_batch": False}})
    assert loose.at_world_size(1).scaling.accumulation_steps == 1


def test_a_total_batch_that_cannot_be_kept_fails_before_the_job_starts():
    # 3 workers x 2 x 1 = 6 images per step; at 2 workers a step is 4 images: no whole accumulation
    with pytest.raises(ConfigError, match=r"total batch 6 .* is not a multiple of 2 workers x batch 2 = 4"):
        load_config({**MINIMAL, "scaling": {"num_workers": [1, 3], "batch_size_per_worker": 2}})
    load_config({**MINIMAL, "scaling": {"num_workers": [1, 3], "batch_size_per_worker": 2, "keep_total_batch": False}})


def test_ray_scaling_config_carries_the_range_strategy_and_resources():
    from dino_platform.train.trainer import ray_scaling_config

    cfg = load_config({**MINIMAL, "scaling": {"num_workers": [1, 2], "placement_strategy": "STRICT_SPREAD",
                                              "resources_per_worker": {"train_slot": 1},
                                              "resize_check_interval_s": 5}})
    ray_cfg = ray_scaling_config(cfg)
    assert ray_cfg.num_workers == (1, 2) and ray_cfg.elasticity_enabled
    assert ray_cfg.placement_strategy == "STRICT_SPREAD"
    assert ray_cfg.resources_per_worker == {"CPU": 0.5, "train_slot": 1.0}
    assert ray_cfg.elastic_resize_monitor_interval_s == 5
    assert ray_scaling_config(load_config(MINIMAL)).num_workers == 2


def test_params_for_tracking_hide_credentials():
    cfg = load_config({**MINIMAL, "tracking": {"tracking_uri": "https://alice:hunter2@mlflow.example/"},
                       "data": {"train_uri": "s3://bucket/train", "transform": {"api_token": "abc"}}})
    flat = flat_params(cfg)
    assert flat["optim.lr"] == "0.0001"
    assert "hunter2" not in flat["tracking.tracking_uri"] and "***" in flat["tracking.tracking_uri"]
    assert flat["data.transform.api_token"] == "***"
    assert isinstance(TrainConfig().to_yaml(), str)
