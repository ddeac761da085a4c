"""Ray cluster-launcher YAMLs: Ray's schema and config preparation, node roles, spot twins, the
project's install and environment on every node, shared memory, the MLflow secret."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
from ray.autoscaler._private.util import prepare_config, validate_config
from support import REPO
from support.clusters import (
    CLUSTERS,
    EXPECTED_LAUNCHERS,
    GIB,
    LAUNCHERS,
    NETWORK_CARDS,
    NODE_RAM_GIB,
    RAY_SCHEMA,
    env_command,
    gpu_node_config,
    gpu_node_type_name,
    instance_type,
    load_launcher,
    node_env,
    run_bash,
    start_option,
)


def test_the_expected_launchers_exist():
    found = {name: load_launcher(name) for name in LAUNCHERS}
    assert set(EXPECTED_LAUNCHERS) <= set(found)
    for name, (provider, itype) in EXPECTED_LAUNCHERS.items():
        assert found[name]["provider"]["type"] == provider, name
        assert instance_type(name, found[name]) == itype, name


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_matches_rays_schema(name):
    errors = list(jsonschema.Draft7Validator(RAY_SCHEMA).iter_errors(load_launcher(name)))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_passes_rays_prepare_and_validate(name):
    # What `ray up` runs before it contacts a provider: defaults merged, then schema and
    # cross-field checks (head type listed, min workers within max workers, ...).
    prepared = prepare_config(load_launcher(name))
    validate_config(prepared)
    assert prepared["max_workers"] >= 1


def _misspelled_key(c):
    c["setup_comands"] = c.pop("setup_commands")


def _gpu_count_as_text(c):
    c["available_node_types"]["h100x8"]["resources"]["GPU"] = "8"


def _unknown_head_type(c):
    c["head_node_type"] = "ray.head.default"


def _min_workers_above_max(c):
    c["available_node_types"]["h100x8"]["min_workers"] = 9


def _setup_command_not_a_string(c):
    c["setup_commands"].append({"run": "bash node_setup.sh"})


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (_misspelled_key, "'setup_comands' was unexpected"),
        (_gpu_count_as_text, "'8' is not of type 'integer'"),
        (_unknown_head_type, "must be one of `available_node_types`"),
        (_min_workers_above_max, "smaller than the sum of `min_workers`"),
        (_setup_command_not_a_string, "is not of type 'string'"),
    ],
)
def test_a_broken_launcher_fails_validation(mutate, reason):
    config = load_launcher("aws-p5-h100")
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(reason)):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", ["aws-p5-h100", "aws-p4d-a100"])
def test_aws_gpu_nodes_use_every_efa_card_and_roles(name):
    config = load_launcher(name)
    node_config = gpu_node_config(config)
    interfaces = node_config["NetworkInterfaces"]
    cards = sorted(i["NetworkCardIndex"] for i in interfaces)
    assert cards == list(range(NETWORK_CARDS[node_config["InstanceType"]]))
    assert [i["DeviceIndex"] for i in interfaces].count(0) == 1
    assert {i["InterfaceType"] for i in interfaces} <= {"efa", "efa-only"}
    assert "Placement" in node_config, "EFA nodes belong in a cluster placement group"
    profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for t in config["available_node_types"].values()}
    assert profiles == {"dino-ray-head", "dino-ray-worker"}
    # Instances launched with several interfaces get no public IP; Ray's launcher then rejects
    # their subnet at `ray up` unless it is told to use internal IPs.
    assert config["provider"]["use_internal_ips"] is True


@pytest.mark.parametrize("name", ["aws-p5-h100", "aws-p4d-a100", "gcp-a3-h100"])
def test_every_gpu_type_has_a_spot_twin_that_differs_only_in_how_it_is_bought(name):
    config = load_launcher(name)
    on_demand_name = gpu_node_type_name(config)
    types = config["available_node_types"]
    on_demand, spot = types[on_demand_name], types[f"{on_demand_name}_spot"]
    assert spot["resources"] == on_demand["resources"]  # a job's workers fit either
    assert spot["min_workers"] == 0  # nothing is kept running on capacity that can vanish
    spot_config, on_demand_config = dict(spot["node_config"]), dict(on_demand["node_config"])
    if config["provider"]["type"] == "aws":
        market = spot_config.pop("InstanceMarketOptions")
        assert market["MarketType"] == "spot"
        assert market["SpotOptions"]["InstanceInterruptionBehavior"] == "terminate"
        assert "InstanceMarketOptions" not in on_demand_config
    else:
        scheduling = spot_config.pop("scheduling")
        assert scheduling["provisioningModel"] == "SPOT" and scheduling["onHostMaintenance"] == "TERMINATE"
        assert on_demand_config.pop("scheduling").get("provisioningModel", "STANDARD") == "STANDARD"
    assert spot_config == on_demand_config


def test_gcp_nodes_use_service_accounts_and_can_run_gpus():
    config = load_launcher("gcp-a3-h100")
    zone = config["provider"]["availability_zone"]
    assert zone.startswith(config["provider"]["region"])
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        [account] = node_config["serviceAccounts"]
        assert account["email"].endswith(".iam.gserviceaccount.com"), name
        assert "https://www.googleapis.com/auth/cloud-platform" in account["scopes"], name
        [disk] = node_config["disks"]
        assert disk["boot"] and disk["initializeParams"]["sourceImage"], name
        assert disk["initializeParams"]["diskType"].startswith(f"zones/{zone}/"), name
    gpu = config["available_node_types"]["h100x8"]
    assert gpu["resources"]["GPU"] == 8
    assert gpu["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_syncs_and_installs_the_project(name):
    config = load_launcher(name)
    assert config["file_mounts"]["~/dino-platform"] == "."
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert ".gitignore" in config["rsync_filter"], "without it .venv would be synced"
    installs = [c for c in config["setup_commands"] if "bash ~/dino-platform/clusters/node_setup.sh" in c]
    assert len(installs) == 1


@pytest.mark.parametrize("name", ["aws-p5-h100", "aws-p4d-a100", "gcp-a3-h100"])
def test_head_has_the_cloud_client_rays_autoscaler_imports(name):
    config = load_launcher(name)
    if config["provider"]["type"] == "aws":
        assert re.search(r'"boto3==', (REPO / "pyproject.toml").read_text()), "boto3 comes with the project"
    else:
        assert any("install -q google-api-python-client==" in c for c in config["head_setup_commands"])


@pytest.mark.parametrize("name", LAUNCHERS)
def test_no_placeholder_inside_shell_commands(name):
    # bash would read `<NAME>` as a redirection and fail with a confusing error.
    config = load_launcher(name)
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    commands = [c for key in keys for c in config.get(key, [])]
    assert commands and not [c for c in commands if re.search(r"<[A-Z][A-Z0-9_]*>", c)]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_node_environment(name, tmp_path):
    config = load_launcher(name)
    env = node_env(config, tmp_path)
    assert env["NCCL_SOCKET_IFNAME"] == "^lo,docker0"
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["CUDA_HOME"] == "/usr/local/cuda-13.0"
    if config["provider"]["type"] == "aws":
        assert env["FI_PROVIDER"] == "efa"
        assert env["FI_EFA_USE_DEVICE_RDMA"] == "1"
        assert env["NCCL_PROTO"] == "simple"
        assert "/opt/amazon/ofi-nccl/lib" in env["LD_LIBRARY_PATH"].split(":")
        assert env["AWS_REGION"] == config["provider"]["region"]
    else:
        assert env["NCCL_IB_DISABLE"] == "1"
    if config["provider"]["type"] != "local":  # the image's PATH already has its venv
        assert env["PATH"].startswith(f"{tmp_path}/dino-venv/bin:")
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert command.startswith(". ~/dino_env.sh && "), command


@pytest.mark.parametrize("name", LAUNCHERS)
def test_object_store_fits_in_shared_memory(name):
    config = load_launcher(name)
    store = start_option(config["worker_start_ray_commands"], "--object-store-memory")
    if config["provider"]["type"] == "local":
        [shm] = [o for o in config["docker"]["run_options"] if o.startswith("--shm-size=")]
        assert shm.endswith("g")
        assert store < int(shm.removeprefix("--shm-size=").removesuffix("g")) * GIB
    else:
        assert store < NODE_RAM_GIB[instance_type(name, config)] / 2 * GIB


@pytest.mark.parametrize("name", ["aws-p5-h100", "aws-p4d-a100", "gcp-a3-h100"])
def test_mlflow_uri_comes_from_the_secret_store_and_fails_clearly(name, tmp_path):
    config = load_launcher(name)
    [command] = [c for c in config["setup_commands"] if "MLFLOW_TRACKING_URI" in c]
    assert re.search(r"aws ssm get-parameter|gcloud secrets versions access", command)
    run_bash(env_command(config), tmp_path)
    # No cloud CLI on PATH, as on a node without the role: the step must stop, naming the source.
    result = run_bash(command, tmp_path, path=str(tmp_path / "no-such-bin"))
    assert result.returncode == 1
    assert "clusters/README.md" in result.stderr
    assert re.search(r"/dino-platform/mlflow-tracking-uri|dino-mlflow-tracking-uri", result.stderr)
    assert "MLFLOW_TRACKING_URI" not in (tmp_path / "dino_env.sh").read_text()


def test_aws_roles_grant_what_the_launchers_read():
    config = load_launcher("aws-p5-h100")
    [command] = [c for c in config["setup_commands"] if "ssm get-parameter" in c]
    parameter = re.search(r"--name (\S+)", command).group(1)
    policies = {role: json.loads((CLUSTERS / "aws" / f"{role}-policy.json").read_text()) for role in ("head", "worker")}
    for role, policy in policies.items():
        statements = {s["Sid"]: s for s in policy["Statement"]}
        ssm = statements["ReadMlflowTrackingUri"]
        assert ssm["Resource"].startswith(f"arn:aws:ssm:{config['provider']['region']}:")
        assert parameter.startswith(ssm["Resource"].split(":parameter", 1)[1].rstrip("*")), role
        assert statements["ReadWriteDataObjects"]["Resource"] == "arn:aws:s3:::<BUCKET>/*", role
    pass_role = {s["Sid"]: s for s in policies["head"]["Statement"]}["GiveWorkersTheirRole"]
    assert pass_role["Resource"].endswith(":role/dino-ray-worker")
    trust = json.loads((CLUSTERS / "aws" / "ec2-trust.json").read_text())
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
