"""The node install recipe (clusters/node_setup.sh) and the image: the project's pins, built kernels."""
from __future__ import annotations

import os
import re
import subprocess

from support import REPO
from support.clusters import CLUSTERS, NODE_SETUP


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
