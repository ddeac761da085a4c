"""Cluster configurations in clusters/: Ray launcher YAMLs, KubeRay manifests, image recipe, docs.

Nothing here reaches a cloud. Launcher YAMLs go through the schema shipped in the installed Ray
and through Ray's own config preparation; AWS node configs through botocore's EC2 request model
and through Ray's AWS bootstrap and node launch against moto's server on loopback; the job
runtime env through Ray's own upload packaging; the shell that the launchers run on nodes is run
here in bash where it can be.
"""
from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import zipfile
from pathlib import Path

import botocore.session
import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from botocore.validate import ParamValidator
from ray._private.runtime_env.packaging import create_package
from ray.autoscaler._private.aws.config import _configure_from_network_interfaces
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
LAUNCHER_DIR = CLUSTERS / "launcher"
KUBERAY_DIR = CLUSTERS / "kuberay"
README = CLUSTERS / "README.md"
NODE_SETUP = CLUSTERS / "node_setup.sh"

# The headline job. The Makefile's `demo` target runs the same script, which makes it the
# documented path while the pipeline itself is written elsewhere.
PIPELINE_SCRIPT = "pipelines/o365_pretrain_coco_ft.py"
PIPELINE_SPEC = "pipelines/o365_pretrain_coco_ft.yaml"
ENTRYPOINT = f"python {PIPELINE_SCRIPT} --spec {PIPELINE_SPEC}"

EXPECTED_LAUNCHERS = {
    "aws-p5-h100": ("aws", "p5.48xlarge"),
    "aws-p4d-a100": ("aws", "p4d.24xlarge"),
    "gcp-a3-h100": ("gcp", "a3-highgpu-8g"),
    "local-docker": ("local", None),
}
# Public instance specs: EFA network cards, and RAM in GiB (Ubuntu's /dev/shm is half of it).
LAUNCHERS = sorted(p.stem for p in LAUNCHER_DIR.glob("*.yaml"))
NETWORK_CARDS = {"p5.48xlarge": 32, "p4d.24xlarge": 4}
NODE_RAM_GIB = {"p5.48xlarge": 2048, "p4d.24xlarge": 1152, "a3-highgpu-8g": 1872e9 / 2**30}
GIB = 2**30

RAY_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load_launcher(name: str) -> dict:
    return yaml.safe_load((LAUNCHER_DIR / f"{name}.yaml").read_text())


def gpu_node_type_name(config: dict) -> str:
    """The on-demand GPU worker type (its spot/preemptible twin is ``<name>_spot``)."""
    workers = [n for n in config["available_node_types"] if n != config["head_node_type"] and not n.endswith("_spot")]
    assert len(workers) == 1, "one on-demand GPU worker type per launcher file"
    return workers[0]


def gpu_node_config(config: dict) -> dict:
    """The node_config of the on-demand GPU worker type."""
    return config["available_node_types"][gpu_node_type_name(config)]["node_config"]


def instance_type(name: str, config: dict) -> str | None:
    if config["provider"]["type"] == "local":
        return None
    node_config = gpu_node_config(config)
    return node_config.get("InstanceType") or node_config.get("machineType")


def env_command(config: dict) -> str:
    [command] = [c for c in config["setup_commands"] if re.search(r"[^>]> ~/dino_env\.sh", c)]
    return command


def run_bash(script: str, home: Path, path: str | None = None) -> subprocess.CompletedProcess:
    env = {"HOME": str(home), "PATH": path or os.environ["PATH"]}
    return subprocess.run(["/bin/bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)


def node_env(config: dict, home: Path) -> dict:
    """Run the launcher's env-file command in bash, then source the file: the node's variables."""
    written = run_bash(env_command(config), home)
    assert written.returncode == 0, written.stderr
    sourced = run_bash(". ~/dino_env.sh && env -0", home)
    assert sourced.returncode == 0, sourced.stderr
    return dict(item.split("=", 1) for item in sourced.stdout.split("\0") if "=" in item)


def start_option(commands: list[str], option: str) -> int:
    [value] = {m for c in commands for m in re.findall(rf"{option}=(\d+)", c)}
    return int(value)


# ---------------------------------------------------------------------------------------------
# Ray cluster-launcher YAMLs


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


def ec2_launch_requests(config: dict) -> dict:
    """Each node type's node_config as Ray's AWS provider sends it to RunInstances."""
    config = _configure_from_network_interfaces(prepare_config(config))
    requests = {}
    for name, node_type in config["available_node_types"].items():
        request = copy.deepcopy(node_type["node_config"])
        subnet_ids = request.pop("SubnetIds")
        request.update(MinCount=1, MaxCount=1, KeyName="ray-autoscaler_us-east-1")
        request["TagSpecifications"] = [{"ResourceType": "instance", "Tags": [{"Key": "ray-cluster-name", "Value": "x"}]}]
        if "NetworkInterfaces" in request:
            request.pop("SecurityGroupIds", None)
        else:
            request["SubnetId"] = subnet_ids[0]
        requests[name] = request
    return requests


RUN_INSTANCES = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape


@pytest.mark.parametrize("name", ["aws-p5-h100", "aws-p4d-a100"])
def test_aws_node_configs_are_valid_run_instances_requests(name):
    for node_type, request in ec2_launch_requests(load_launcher(name)).items():
        report = ParamValidator().validate(request, RUN_INSTANCES)
        assert not report.has_errors(), f"{name} {node_type}: {report.generate_report()}"


def test_a_mistyped_aws_node_config_key_is_rejected():
    config = load_launcher("aws-p5-h100")
    node_config = config["available_node_types"]["h100x8"]["node_config"]
    node_config["InstanceTyp"] = node_config.pop("InstanceType")
    report = ParamValidator().validate(ec2_launch_requests(config)["h100x8"], RUN_INSTANCES)
    assert report.has_errors() and "InstanceTyp" in report.generate_report()


@pytest.fixture(scope="module")
def aws_account(tmp_path_factory):
    """moto's server on loopback as a fresh AWS account with README steps 3-4 done: a private
    subnet, the security group, and the head/worker roles made from clusters/aws/*.json."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        env.setenv("AWS_ACCESS_KEY_ID", "moto")
        env.setenv("AWS_SECRET_ACCESS_KEY", "moto")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        env.setenv("HOME", str(tmp_path_factory.mktemp("home")))  # Ray writes its key pair there
        ec2, iam = boto3.client("ec2"), boto3.client("iam")
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24", AvailabilityZone="us-east-1a")["Subnet"]
        group = ec2.create_security_group(GroupName="dino-ray", Description="dino-platform Ray", VpcId=vpc)
        filled = {"<ACCOUNT_ID>": "123456789012", "<BUCKET>": "dino-data"}

        def document(name: str) -> str:
            text = (CLUSTERS / "aws" / name).read_text()
            for placeholder, value in filled.items():
                text = text.replace(placeholder, value)
            return text

        for role in ("head", "worker"):
            name = f"dino-ray-{role}"
            iam.create_role(RoleName=name, AssumeRolePolicyDocument=document("ec2-trust.json"))
            iam.put_role_policy(RoleName=name, PolicyName=name, PolicyDocument=document(f"{role}-policy.json"))
            iam.create_instance_profile(InstanceProfileName=name)
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
        yield {"ec2": ec2, "<PRIVATE_SUBNET_ID>": subnet["SubnetId"], "<SECURITY_GROUP_ID>": group["GroupId"]}
    server.stop()


def filled_launcher(name: str, values: dict) -> dict:
    text = (LAUNCHER_DIR / f"{name}.yaml").read_text()
    for placeholder in ("<PRIVATE_SUBNET_ID>", "<SECURITY_GROUP_ID>"):
        text = text.replace(placeholder, values[placeholder])
    return yaml.safe_load(text)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["aws-p5-h100", "aws-p4d-a100"])
def test_ray_bootstraps_the_aws_launcher_and_launches_nodes(name, aws_account):
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    config = bootstrap_aws(prepare_config(filled_launcher(name, aws_account)))
    for node_type in config["available_node_types"].values():
        node_config = node_type["node_config"]
        assert set(node_config["SubnetIds"]) == {aws_account["<PRIVATE_SUBNET_ID>"]}
        assert set(node_config["SecurityGroupIds"]) == {aws_account["<SECURITY_GROUP_ID>"]}
        assert node_config["KeyName"].startswith("ray-autoscaler")
    assert Path(config["auth"]["ssh_private_key"]).is_file()

    # moto cannot resolve the public DLAMI parameter behind `resolve:ssm:`; any AMI stands in.
    ec2 = aws_account["ec2"]
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    for node_type_name, node_type in config["available_node_types"].items():
        node_config = {**node_type["node_config"], "ImageId": image}
        provider.create_node(node_config, {"ray-user-node-type": node_type_name}, 1)
    launched = {
        i["InstanceType"]: i["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
        for r in ec2.describe_instances(Filters=[{"Name": "tag:ray-cluster-name", "Values": [config["cluster_name"]]}])[
            "Reservations"
        ]
        for i in r["Instances"]
    }
    assert launched == {"m7i.4xlarge": "dino-ray-head", instance_type(name, config): "dino-ray-worker"}


@pytest.mark.slow
def test_ray_refuses_the_private_subnet_without_internal_ips(aws_account):
    from click.exceptions import ClickException
    from ray.autoscaler._private.aws.config import bootstrap_aws

    config = filled_launcher("aws-p5-h100", aws_account)
    config["provider"]["use_internal_ips"] = False
    with pytest.raises(ClickException, match="No usable subnets"):
        bootstrap_aws(prepare_config(config))


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


# ---------------------------------------------------------------------------------------------
# Node install recipe and image


def pyproject_pins() -> dict:
    text = (REPO / "pyproject.toml").read_text()
    return {name: re.search(rf'"{name}==([^"]+)"', text).group(1) for name in ("torch", "torchvision")}


def test_node_setup_builds_the_kernels_with_the_project_pins():
    script = NODE_SETUP.read_text()
    assert subprocess.run(["bash", "-n", str(NODE_SETUP)]).returncode == 0
    pins = pyproject_pins()
    assert f'"torch=={pins["torch"]}"' in script and f'"torchvision=={pins["torchvision"]}"' in script
    assert 'ARCH_LIST="8.0;9.0+PTX"' in script
    assert 'FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH_LIST"' in script
    assert "install -q --no-build-isolation -e ." in script
    assert "https://download.pytorch.org/whl/cu130" in script


def test_node_setup_stops_when_the_repository_was_not_synced(tmp_path):
    missing = tmp_path / "dino-platform"
    result = subprocess.run(
        ["bash", str(NODE_SETUP)], env={**os.environ, "DINO_REPO_DIR": str(missing)}, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert f"{missing}/pyproject.toml not found" in result.stderr


def test_image_uses_the_same_recipe_and_pins():
    dockerfile = (CLUSTERS / "docker" / "Dockerfile").read_text()
    pins = pyproject_pins()
    assert f'"torch=={pins["torch"]}" "torchvision=={pins["torchvision"]}"' in dockerfile
    assert re.search(r"^FROM nvidia/cuda:13\.0\.\d+-devel-ubuntu22\.04$", dockerfile, re.M)
    assert "bash clusters/node_setup.sh" in dockerfile
    assert "WORKDIR /opt/dino-platform" in dockerfile
    ignored = (CLUSTERS / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# ---------------------------------------------------------------------------------------------
# KubeRay manifests


def quantity_bytes(value) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    return float(match.group(1)) * units.get(match.group(2) or "", 1)


def pod_problems(where: str, template: dict, start_params: dict, gpus: int) -> list[str]:
    problems = []
    spec = template.get("spec", {})
    containers = spec.get("containers") or []
    if not containers or not containers[0].get("image"):
        return [f"{where}: template.spec.containers[0].image missing"]
    container = containers[0]
    if spec.get("serviceAccountName") != "dino-ray":
        problems.append(f"{where}: serviceAccountName must be dino-ray (object storage by role)")
    limits = container.get("resources", {}).get("limits", {})
    if gpus and str(limits.get("nvidia.com/gpu")) != str(gpus):
        problems.append(f"{where}: resources.limits nvidia.com/gpu must be {gpus}")
    env = {e["name"]: e for e in container.get("env", [])}
    if "secretKeyRef" not in env.get("MLFLOW_TRACKING_URI", {}).get("valueFrom", {}):
        problems.append(f"{where}: MLFLOW_TRACKING_URI must come from a Secret")
    if gpus and env.get("NCCL_SOCKET_IFNAME", {}).get("value") != "^lo,docker0":
        problems.append(f"{where}: NCCL_SOCKET_IFNAME not set")
    shm_volumes = {m["name"] for m in container.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"}
    volumes = {v["name"]: v for v in spec.get("volumes", []) if v["name"] in shm_volumes}
    if len(volumes) != 1 or list(volumes.values())[0].get("emptyDir", {}).get("medium") != "Memory":
        problems.append(f"{where}: /dev/shm must be an emptyDir with medium Memory")
    else:
        shm = quantity_bytes(list(volumes.values())[0]["emptyDir"]["sizeLimit"])
        store = quantity_bytes(start_params.get("object-store-memory", "0"))
        if not 0 < store < shm:
            problems.append(f"{where}: object-store-memory must be set and below the /dev/shm sizeLimit")
    if not all(isinstance(v, str) for v in start_params.values()):
        problems.append(f"{where}: rayStartParams values must be strings")
    return problems


def kuberay_problems(doc: dict) -> list[str]:
    """What a RayCluster or RayJob manifest lacks for this project; empty when complete."""
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append("apiVersion must be ray.io/v1")
    if not doc.get("metadata", {}).get("name"):
        problems.append("metadata.name missing")
    kind = doc.get("kind")
    if kind == "RayJob":
        spec = doc.get("spec", {})
        if spec.get("entrypoint") != ENTRYPOINT:
            problems.append(f"spec.entrypoint must be {ENTRYPOINT!r}")
        cluster = spec.get("rayClusterSpec")
        if not cluster:
            return problems + ["spec.rayClusterSpec missing"]
    elif kind == "RayCluster":
        cluster = doc.get("spec", {})
    else:
        return problems + [f"kind must be RayCluster or RayJob, not {kind!r}"]
    if cluster.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion must be the pinned Ray, {ray.__version__}")
    if cluster.get("authOptions", {}).get("mode") != "token":
        problems.append("authOptions.mode must be token")
    head = cluster.get("headGroupSpec", {})
    if not isinstance(head.get("rayStartParams"), dict):
        problems.append("headGroupSpec.rayStartParams missing")
    problems += pod_problems("headGroupSpec", head.get("template", {}), head.get("rayStartParams") or {}, gpus=0)
    groups = cluster.get("workerGroupSpecs") or []
    if not groups:
        problems.append("workerGroupSpecs missing")
    for i, group in enumerate(groups):
        where = f"workerGroupSpecs[{i}]"
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "template"):
            if key not in group:
                problems.append(f"{where}.{key} missing")
        counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if all(isinstance(c, int) for c in counts) and not counts[0] <= counts[1] <= counts[2]:
            problems.append(f"{where}: need minReplicas <= replicas <= maxReplicas")
        problems += pod_problems(where, group.get("template", {}), group.get("rayStartParams") or {}, gpus=8)
    return problems


def test_rayjob_worker_group_spans_the_pipelines_elastic_training_range(monkeypatch):
    from dino_platform.pipeline import load_spec
    from dino_platform.pipeline.stages.train import train_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # the RayJob's secret, on a cluster
    spec = load_spec(REPO / PIPELINE_SPEC)
    scalings = [train_config(spec, name).scaling for name, stage in spec.stages.items() if stage.kind == "train"]
    elastic = [s for s in scalings if s.elastic]
    assert elastic, "the headline job trains elastically"
    low, high = min(s.min_workers for s in elastic), max(s.max_workers for s in elastic)
    assert all(s.max_workers <= low for s in scalings if not s.elastic)  # fixed stages fit the smallest group
    doc = yaml.safe_load((KUBERAY_DIR / "rayjob.yaml").read_text())
    [group] = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    [container] = group["template"]["spec"]["containers"]
    gpus_per_pod = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert group["minReplicas"] * gpus_per_pod == low  # the smallest group the job keeps training with
    assert group["maxReplicas"] * gpus_per_pod == high  # the largest it grows back to


@pytest.mark.parametrize("name", ["raycluster", "rayjob"])
def test_kuberay_manifest_has_what_kuberay_and_the_project_need(name):
    doc = yaml.safe_load((KUBERAY_DIR / f"{name}.yaml").read_text())
    assert kuberay_problems(doc) == []


def _drop_gpu_limit(cluster):
    del cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]


def _drop_group_name(cluster):
    del cluster["workerGroupSpecs"][0]["groupName"]


def _shm_on_disk(cluster):
    cluster["workerGroupSpecs"][0]["template"]["spec"]["volumes"][0]["emptyDir"].pop("medium")


def _literal_tracking_uri(cluster):
    cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "MLFLOW_TRACKING_URI", "value": "https://mlflow.example.com"}
    ]


def _no_image(cluster):
    del cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


@pytest.mark.parametrize("mutate", [_drop_gpu_limit, _drop_group_name, _shm_on_disk, _literal_tracking_uri, _no_image])
def test_a_broken_kuberay_manifest_is_reported(mutate):
    doc = yaml.safe_load((KUBERAY_DIR / "rayjob.yaml").read_text())
    mutate(doc["spec"]["rayClusterSpec"])
    assert kuberay_problems(doc)


def test_rayjob_without_cluster_or_with_another_entrypoint_is_reported():
    doc = yaml.safe_load((KUBERAY_DIR / "rayjob.yaml").read_text())
    doc["spec"]["entrypoint"] = "python pipelines/other.py"
    del doc["spec"]["rayClusterSpec"]
    assert len(kuberay_problems(doc)) == 2


def test_service_account_is_bound_to_cloud_roles():
    doc = yaml.safe_load((KUBERAY_DIR / "serviceaccount.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) == ("v1", "ServiceAccount", "dino-ray")
    annotations = doc["metadata"]["annotations"]
    assert annotations["eks.amazonaws.com/role-arn"].endswith(":role/dino-ray-worker")
    assert annotations["iam.gke.io/gcp-service-account"].startswith("dino-ray-worker@")


# ---------------------------------------------------------------------------------------------
# The job entrypoint and its runtime environment


def test_entrypoint_matches_the_documented_paths():
    assert PIPELINE_SCRIPT in (REPO / "Makefile").read_text()
    readme = README.read_text()
    assert "ray job submit --working-dir . --runtime-env clusters/job_runtime_env.yaml" in readme
    assert ENTRYPOINT in readme


def test_entrypoint_files_exist():
    if not (REPO / PIPELINE_SCRIPT).exists():
        pytest.skip(f"{PIPELINE_SCRIPT} is not in the repository yet")
    assert (REPO / PIPELINE_SPEC).is_file()


def test_job_upload_leaves_the_compiled_packages_to_the_nodes(tmp_path):
    # A tree shaped like the repository, packaged by Ray's own working_dir code with the real
    # .gitignore and excludes.
    tree = tmp_path / "checkout"
    for relative in (
        "dino_core/__init__.py",
        "dino_core/ops/_ext.cpython-311-x86_64-linux-gnu.so",
        "platform/dino_platform/__init__.py",
        "pipelines/o365_pretrain_coco_ft.py",
        "pipelines/o365_pretrain_coco_ft.yaml",
        ".venv/lib/site.py",
        "pyproject.toml",
    ):
        (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        (tree / relative).write_text("x")
    (tree / ".gitignore").write_text((REPO / ".gitignore").read_text())
    excludes = yaml.safe_load((CLUSTERS / "job_runtime_env.yaml").read_text())["excludes"]
    package = tmp_path / "package.zip"
    create_package(str(tree), package, include_gitignore=True, excludes=excludes)
    names = set(zipfile.ZipFile(package).namelist())
    assert {"pipelines/o365_pretrain_coco_ft.py", "pipelines/o365_pretrain_coco_ft.yaml"} <= names
    assert not [n for n in names if n.startswith(("dino_core", "platform", ".venv"))]


# ---------------------------------------------------------------------------------------------
# No secrets, documented placeholders, sizing


SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key setting": re.compile(r"aws_secret_access_key\s*[=:]", re.I),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "service-account key file": re.compile(r'"private_key(?:_id)?"\s*:'),
    "credentials in a URL": re.compile(r"://[^/\s:@<>]+:[^/\s@<>]+@"),
    # A password/secret/token setting with a long literal value (not a --flag naming a secret).
    "secret literal": re.compile(
        r"(?<![-\w])\w*(?:password|passwd|secret|token)\w*\s*[:=]\s*['\"]?[A-Za-z0-9+/_\-]{16,}", re.I
    ),
}


def secret_findings(text: str) -> list[str]:
    return [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


def cluster_files() -> list[Path]:
    return sorted(p for p in CLUSTERS.rglob("*") if p.is_file())


def test_no_credentials_in_cluster_files():
    findings = {str(p.relative_to(REPO)): secret_findings(p.read_text()) for p in cluster_files()}
    assert {path: found for path, found in findings.items() if found} == {}


@pytest.mark.parametrize(
    "planted",
    [
        "AKIA" + "Q" * 16,
        "aws_secret_access_key = " + "x" * 40,
        "-----BEGIN RSA " + "PRIVATE KEY-----",
        '{"private_key": "..."}',
        "MLFLOW_TRACKING_URI=https://user:" + "pw" + "@mlflow.example.com",
        "MLFLOW_TRACKING_TOKEN: " + "a1B2" * 6,
    ],
)
def test_the_credential_scan_finds_planted_secrets(planted):
    assert secret_findings(f"ok: 1\n{planted}\n")


def test_every_placeholder_is_documented():
    documented = set(re.findall(r"^\| ((?:`<[A-Z0-9_]+>`(?:, )?)+) \|", README.read_text(), re.M))
    documented = {p for cell in documented for p in re.findall(r"<[A-Z0-9_]+>", cell)}
    used = {p for f in cluster_files() if f != README for p in re.findall(r"<[A-Z][A-Z0-9_]*>", f.read_text())}
    assert used and used <= documented, sorted(used - documented)


def sizing_rows(assumptions: dict) -> list[list[str]]:
    """The sizing table as README shows it, computed from the stated assumptions."""
    prices = assumptions["usd_per_node_hour"]
    rows = []
    for dataset, images in assumptions["images_per_epoch"].items():
        for model, speed in assumptions["train_images_per_s_per_gpu"].items():
            for gpus, efficiency in assumptions["scaling_efficiency"].items():
                hours = {gpu: images / (speed[gpu] * gpus * efficiency) / 3600 for gpu in ("H100", "A100")}
                node_hours = {gpu: h * gpus / 8 for gpu, h in hours.items()}
                rows.append([
                    dataset, model, str(gpus),
                    "{}:{:02d}".format(*divmod(round(hours["H100"] * 60), 60)),
                    str(round(node_hours["H100"] * prices["p5.48xlarge"])),
                    "{}:{:02d}".format(*divmod(round(hours["A100"] * 60), 60)),
                    str(round(node_hours["A100"] * prices["p4d.24xlarge"])),
                    str(round(node_hours["H100"] * prices["a3-highgpu-8g"])),
                ])
    return rows


def test_sizing_table_follows_from_its_stated_assumptions():
    readme = README.read_text()
    [block] = re.findall(r"```yaml\n(# sizing assumptions\n.*?)```", readme, re.S)
    assumptions = yaml.safe_load(block)
    table = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in readme.splitlines()
        if re.match(r"\| (Objects365|COCO) \|", line)
    ]
    assert table == sizing_rows(assumptions)
    assert "estimates, not measurements" in readme
