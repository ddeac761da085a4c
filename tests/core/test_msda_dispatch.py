"""What the MSDA dispatcher does when a compiled kernel cannot run here, and which GPUs a build targets."""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os

import pytest
import torch
from support import REPO

# the module, not the function dino_core.ops re-exports under the same name
msda = importlib.import_module("dino_core.ops.ms_deform_attn")

NO_IMAGE = "CUDA error: no kernel image is available for execution on the device"


def _inputs():
    torch.manual_seed(0)
    shapes, start = torch.tensor([[6, 7], [3, 4]]), torch.tensor([0, 42])
    value = torch.randn(1, 54, 2, 8)
    locations = torch.rand(1, 5, 2, 2, 3, 2)
    weights = torch.softmax(torch.randn(1, 5, 2, 2 * 3), -1).view(1, 5, 2, 2, 3)
    return value, shapes, start, locations, weights


@pytest.fixture
def broken_kernel(monkeypatch):
    """A "cpu" kernel that fails like a library built without this GPU's architecture."""
    msda._load_compiled()
    launches = []

    def kernel(*args):
        launches.append(1)
        raise RuntimeError(NO_IMAGE)

    monkeypatch.setitem(msda._KERNELS, "cpu", kernel)
    monkeypatch.setitem(msda._KERNEL_DTYPES, "cpu", frozenset({torch.float32}))
    monkeypatch.setattr(msda, "_failed_first_launch", {})
    monkeypatch.setattr(msda, "_launched", set())
    monkeypatch.delenv("DINO_MSDA_IMPL", raising=False)
    return launches


def test_a_kernel_failing_its_first_launch_falls_back_with_one_warning(broken_kernel, caplog):
    args = _inputs()
    assert msda.selected_implementation("cpu") == "cpu"
    with caplog.at_level(logging.WARNING, logger=msda.__name__):
        outputs = [msda.ms_deform_attn(*args) for _ in range(3)]
    expected = msda.ms_deform_attn_reference(*args)
    assert all(torch.equal(out, expected) for out in outputs)
    assert len(broken_kernel) == 1  # never launched again
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "first launch" in warnings[0] and "no kernel image" in warnings[0]
    assert msda.selected_implementation("cpu") == "pytorch"


def test_a_forced_kernel_fails_loudly(broken_kernel, monkeypatch):
    monkeypatch.setenv("DINO_MSDA_IMPL", "cpu")
    with pytest.raises(RuntimeError, match="no kernel image"):
        msda.ms_deform_attn(*_inputs())


def test_only_the_first_launch_may_fall_back(monkeypatch):
    msda._load_compiled()
    state = {"calls": 0}

    def flaky(*args):
        state["calls"] += 1
        if state["calls"] > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return msda.ms_deform_attn_reference(*args)

    monkeypatch.setitem(msda._KERNELS, "cpu", flaky)
    monkeypatch.setitem(msda._KERNEL_DTYPES, "cpu", frozenset({torch.float32}))
    monkeypatch.setattr(msda, "_failed_first_launch", {})
    monkeypatch.setattr(msda, "_launched", set())
    monkeypatch.delenv("DINO_MSDA_IMPL", raising=False)
    msda.ms_deform_attn(*_inputs())
    with pytest.raises(RuntimeError, match="illegal memory access"):  # a later failure is a real error
        msda.ms_deform_attn(*_inputs())


def _build_config():
    path = REPO / "csrc" / "build.py"
    spec = importlib.util.spec_from_file_location("dino_msda_build_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_builds_carry_ptx_for_newer_gpus(monkeypatch):
    build = _build_config()
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert build.DEFAULT_CUDA_ARCH_LIST.split(";") == ["7.5", "8.0", "9.0+PTX"]
    # a JIT build on a GPU machine targets the visible GPUs (torch adds their PTX)
    build.ensure_cuda_arch_list(for_visible_gpus=True)
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ
    assert build.ensure_cuda_arch_list() == "7.5;8.0;9.0+PTX"  # prebuilt: the portable default
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert build.ensure_cuda_arch_list(for_visible_gpus=True) == "8.6"  # the caller's list wins
