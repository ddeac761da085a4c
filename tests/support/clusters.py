"""What the cluster-configuration tests share: where clusters/ lives, the launcher files and
the instance facts they are checked against, and running a launcher's shell in bash."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import ray
import ray.autoscaler
import yaml

from support import REPO

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

