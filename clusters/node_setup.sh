#!/usr/bin/env bash
# Installs dino-platform on one Ray node (Ubuntu 22.04): the CUDA 13.0 toolkit (nvcc for the
# MSDeformAttn kernel; torch's cu130 wheels bring their own runtime), a Python 3.11 venv,
# torch/torchvision from the CUDA 13.0 index, then the project with its CUDA kernels built.
#
# Called by every launcher YAML in clusters/launcher/ after `ray up` has synced the repository
# to ~/dino-platform. It is idempotent: `ray up` re-runs it on every node on each update.
# The image in clusters/docker/Dockerfile does the same steps for KubeRay and the local cluster.
set -euo pipefail

REPO_DIR="${DINO_REPO_DIR:-$HOME/dino-platform}"
VENV_DIR="${DINO_VENV_DIR:-$HOME/dino-venv}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda-13.0}"
TORCH_INDEX="https://download.pytorch.org/whl/cu130"
# Equal to the pins in pyproject.toml (tests/clusters/ checks it).
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")
# A100 (sm_80) and H100 (sm_90), the GPUs of the launcher configs, plus PTX for newer GPUs.
ARCH_LIST="8.0;9.0+PTX"
# CUDA 13.0 needs an R580 or newer driver.
MIN_DRIVER_MAJOR=580

die() {
    echo "node_setup: $*" >&2
    exit 1
}

[ -f "$REPO_DIR/pyproject.toml" ] ||
    die "$REPO_DIR/pyproject.toml not found: the launcher YAML's file_mounts must sync the repository to $REPO_DIR"

. /etc/os-release
[ "${VERSION_ID:-}" = "22.04" ] ||
    die "Ubuntu 22.04 expected (python3.11 and the CUDA apt repository below), found ${PRETTY_NAME:-unknown}: pick a 22.04 image"

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    has_gpu=1
    driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)"
    [ "${driver%%.*}" -ge "$MIN_DRIVER_MAJOR" ] ||
        die "NVIDIA driver $driver is older than R$MIN_DRIVER_MAJOR, which CUDA 13.0 (torch cu130) needs: use a newer image (clusters/README.md, 'Images')"
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_install() {
    $SUDO apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    curl -fsSL -o /tmp/cuda-keyring.deb \
        "https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2204/x86_64/cuda-keyring_1.1-1_all.deb"
    $SUDO dpkg -i /tmp/cuda-keyring.deb
    apt_install cuda-toolkit-13-0
fi
[ -x "$CUDA_HOME/bin/nvcc" ] || die "nvcc not found at $CUDA_HOME/bin/nvcc after installing cuda-toolkit-13-0"

# python3.11-dev: the extension build needs Python.h.
if ! dpkg -s python3.11-venv python3.11-dev >/dev/null 2>&1; then
    apt_install python3.11 python3.11-venv python3.11-dev
fi
[ -x "$VENV_DIR/bin/python" ] || python3.11 -m venv "$VENV_DIR"
PIP=("$VENV_DIR/bin/python" -m pip)

"${PIP[@]}" install -q --upgrade "pip>=24" "setuptools>=68" wheel
"${PIP[@]}" install -q --index-url "$TORCH_INDEX" "${TORCH_PINS[@]}"
# --no-build-isolation: build the kernels against the torch just installed, not a second copy.
(cd "$REPO_DIR" &&
    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH_LIST" CUDA_HOME="$CUDA_HOME" \
        "${PIP[@]}" install -q --no-build-isolation -e .)

# A GPU node without the compiled kernel would train on the slow grid_sample fallback; fail here
# instead. CPU-only head nodes skip the check.
if [ "$has_gpu" = 1 ]; then
    "$VENV_DIR/bin/python" -c '
import sys
import torch
from dino_core.ops import available_implementations
impls = available_implementations()
if "cuda" not in impls:
    sys.exit(f"node_setup: the MSDeformAttn CUDA kernel did not build (available: {impls}); see the pip output above")
print(f"node_setup: torch {torch.__version__}, {torch.cuda.device_count()} GPUs, MSDeformAttn implementations {impls}")
'
fi
echo "node_setup: done ($VENV_DIR)"
