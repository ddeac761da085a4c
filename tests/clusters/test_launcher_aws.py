"""AWS launchers through botocore's EC2 request model, and Ray's AWS bootstrap and node launch
against moto's server on loopback (nothing reaches a cloud)."""
from __future__ import annotations

import copy
import socket
from pathlib import Path

import botocore.session
import pytest
import yaml
from botocore.validate import ParamValidator
from ray.autoscaler._private.aws.config import _configure_from_network_interfaces
from ray.autoscaler._private.util import prepare_config
from support.clusters import CLUSTERS, LAUNCHER_DIR, instance_type, load_launcher


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
