"""Compiled MSDeformAttn kernels (csrc/) against the PyTorch reference, and the dispatch rules.

CPU tests need ``dino_core._C`` (``make ext``); they fail when it is missing unless the build was
switched off on purpose with ``DINO_BUILD_EXT=0``. GPU tests carry the ``gpu`` marker.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Sequence, Tuple

import pytest
import torch

from dino_core.ops import available_implementations, ms_deform_attn, ms_deform_attn_reference, selected_implementation

# The module (the package re-exports its function under the same name).
msda = importlib.import_module("dino_core.ops.ms_deform_attn")

Shapes = Sequence[Tuple[int, int]]


@pytest.fixture(scope="module")
def compiled():
    """The compiled, differentiable kernel (``dino_core.ops._ext.ms_deform_attn_compiled``)."""
    try:
        from dino_core.ops import _ext
    except ImportError as exc:
        if os.environ.get("DINO_BUILD_EXT") == "0":
            pytest.skip("extension build disabled with DINO_BUILD_EXT=0")
        pytest.fail(f"dino_core._C is not built ({exc}); run `make ext`")
    return _ext.ms_deform_attn_compiled


def make_inputs(
    shapes: Shapes,
    batch: int = 2,
    heads: int = 3,
    channels: int = 5,
    queries: int = 7,
    points: int = 3,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    location_range: Tuple[float, float] = (-0.2, 1.2),
    seed: int = 0,
):
    """Random inputs; locations span ``location_range`` so some corners fall outside the maps."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    num_keys = int(areas.sum())
    levels = len(shapes)
    value = torch.randn(batch, num_keys, heads, channels, generator=gen, dtype=torch.float64)
    low, high = location_range
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=gen, dtype=torch.float64)
    locations = low + (high - low) * locations
    weights = torch.rand(batch, queries, heads, levels * points, generator=gen, dtype=torch.float64).softmax(-1)
    weights = weights.view(batch, queries, heads, levels, points)
    to = dict(device=device, dtype=dtype)
    return (value.to(**to), spatial_shapes.to(device), level_start_index.to(device), locations.to(**to),
            weights.to(**to))


def forward_and_grads(fn, inputs, grad_output=None):
    """Output and gradients w.r.t. value, sampling_locations and attention_weights."""
    value, spatial_shapes, level_start_index, locations, weights = (
        t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs)
    out = fn(value, spatial_shapes, level_start_index, locations, weights)
    if grad_output is None:
        grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad_output.to(out))
    return out.detach(), grad_output, (value.grad, locations.grad, weights.grad)


# Non-square levels, 1 to 5 levels, odd and DINO-like channel counts.
CASES = [
    dict(shapes=[(7, 5)], batch=1, heads=1, channels=1, points=1),
    dict(shapes=[(6, 9), (3, 5)], batch=2, heads=2, channels=5, points=2),
    dict(shapes=[(13, 7), (7, 4), (4, 2)], batch=2, heads=3, channels=8, points=4),
    dict(shapes=[(20, 33), (10, 17), (5, 9), (3, 5)], batch=2, heads=8, channels=32, points=4),
    dict(shapes=[(11, 14), (6, 7), (3, 4), (2, 2), (1, 1)], batch=1, heads=4, channels=6, points=3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c['shapes'])}levels-D{c['channels']}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_kernel_matches_reference(compiled, case, dtype):
    inputs = make_inputs(**case, queries=9, dtype=dtype, seed=len(case["shapes"]))
    out_ref, grad_output, grads_ref = forward_and_grads(ms_deform_attn_reference, inputs)
    out, _, grads = forward_and_grads(compiled, inputs, grad_output)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, out_ref, **tol)
    for name, grad, grad_ref in zip(("value", "sampling_locations", "attention_weights"), grads, grads_ref):
        # Location gradients scale with the map size; compare relative to their magnitude.
        scale = max(1.0, grad_ref.abs().max().item())
        torch.testing.assert_close(grad, grad_ref, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m: f"{name}: {m}")


def test_cpu_kernel_gradcheck(compiled):
    inputs = make_inputs([(5, 7), (3, 2)], batch=2, heads=2, channels=3, queries=4, points=2, seed=3)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    value.requires_grad_()
    locations.requires_grad_()
    weights.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, loc, w: compiled(v, spatial_shapes, level_start_index, loc, w),
        (value, locations, weights), eps=1e-6, atol=1e-6)


def test_points_outside_every_map_give_zeros(compiled):
    inputs = list(make_inputs([(4, 6), (2, 3)], location_range=(1.6, 3.0)))
    out, _, (grad_value, grad_locations, grad_weights) = forward_and_grads(compiled, inputs)
    assert torch.count_nonzero(out) == 0
    assert torch.count_nonzero(grad_value) == 0
    assert torch.count_nonzero(grad_locations) == 0
    assert torch.count_nonzero(grad_weights) == 0


def test_cpu_kernel_accepts_mixed_dtypes_and_empty_queries(compiled):
    value, shapes, starts, locations, weights = make_inputs([(5, 4), (3, 3)], dtype=torch.float32)
    out = compiled(value, shapes, starts, locations.double(), weights.double())  # cast to value's precision
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ms_deform_attn_reference(value, shapes, starts, locations, weights))
    empty = compiled(value, shapes, starts, locations[:, :0], weights[:, :0])
    assert empty.shape == (value.shape[0], 0, value.shape[2] * value.shape[3])


def test_cpu_kernel_rejects_inconsistent_levels(compiled):
    value, shapes, starts, locations, weights = make_inputs([(5, 4), (3, 3)])
    with pytest.raises(RuntimeError, match="does not fit in value's S"):
        compiled(value, shapes, starts + 5, locations, weights)
    with pytest.raises(RuntimeError, match="attention_weights"):
        compiled(value, shapes, starts, locations, weights[..., :1])


def test_cpu_kernel_is_deterministic_across_threads(compiled):
    inputs = make_inputs([(20, 33), (10, 17)], batch=2, heads=4, channels=8, queries=64, dtype=torch.float32)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, grad_output, grads_one = forward_and_grads(compiled, inputs)
        torch.set_num_threads(max(2, previous))
        _, _, grads_many = forward_and_grads(compiled, inputs, grad_output)
    finally:
        torch.set_num_threads(previous)
    for grad_one, grad_many in zip(grads_one, grads_many):
        assert torch.equal(grad_one, grad_many)


# ---------------------------------------------------------------------------------------- dispatch


@pytest.fixture
def fresh_announcements(monkeypatch):
    monkeypatch.setattr(msda, "_announced", set())


def test_dispatch_prefers_cpu_kernel_for_supported_dtypes(compiled, monkeypatch, fresh_announcements, caplog):
    monkeypatch.delenv("DINO_MSDA_IMPL", raising=False)
    assert available_implementations() == [k for k in ("cuda", "cpu") if k in msda._KERNELS] + ["pytorch"]
    assert "cpu" in available_implementations()
    assert selected_implementation("cpu", torch.float32) == "cpu"
    assert selected_implementation("cpu", torch.float64) == "cpu"
    assert selected_implementation("cpu", torch.bfloat16) == "pytorch"  # no bf16 CPU kernel: reference
    inputs = make_inputs([(6, 5), (3, 3)], dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger=msda.__name__):
        out = ms_deform_attn(*inputs)
        ms_deform_attn(*inputs)
    assert torch.equal(out, compiled(*inputs))
    lines = [r.getMessage() for r in caplog.records if "MSDeformAttn: using" in r.getMessage()]
    assert lines == ["MSDeformAttn: using the cpu implementation on cpu (float32)"]


def test_env_forces_reference(compiled, monkeypatch, fresh_announcements):
    monkeypatch.setenv("DINO_MSDA_IMPL", "pytorch")
    assert selected_implementation("cpu", torch.float32) == "pytorch"
    inputs = make_inputs([(6, 5), (3, 3)], dtype=torch.float32)
    assert torch.equal(ms_deform_attn(*inputs), ms_deform_attn_reference(*inputs))


def test_env_rejects_unknown_or_unsupported_choices(compiled, monkeypatch):
    monkeypatch.setenv("DINO_MSDA_IMPL", "triton")
    with pytest.raises(ValueError, match="DINO_MSDA_IMPL"):
        selected_implementation("cpu")
    monkeypatch.setenv("DINO_MSDA_IMPL", "cpu")
    with pytest.raises(RuntimeError, match="bfloat16"):
        selected_implementation("cpu", torch.bfloat16)
    if "cuda" not in available_implementations():
        monkeypatch.setenv("DINO_MSDA_IMPL", "cuda")
        with pytest.raises(RuntimeError, match="not built"):
            selected_implementation("cpu")


# --------------------------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_kernel(compiled):
    if "cuda" not in available_implementations():
        pytest.fail("a GPU is visible but the CUDA kernels are neither prebuilt nor JIT-built")
    return compiled


@gpu
@needs_cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c['shapes'])}levels-D{c['channels']}")
def test_cuda_fp32_matches_reference(cuda_kernel, case):
    inputs = make_inputs(**case, queries=33, dtype=torch.float32, device="cuda")
    out_ref, grad_output, grads_ref = forward_and_grads(ms_deform_attn_reference, inputs)
    out, _, grads = forward_and_grads(cuda_kernel, inputs, grad_output)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for name, grad, grad_ref in zip(("value", "sampling_locations", "attention_weights"), grads, grads_ref):
        scale = max(1.0, grad_ref.abs().max().item())
        torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("channels", [32, 6], ids=["vectorised", "scalar"])
def test_cuda_half_precision_close_to_fp32_reference(cuda_kernel, dtype, tol, channels):
    inputs32 = make_inputs([(20, 33), (10, 17), (5, 9), (3, 5)], batch=2, heads=8, channels=channels, queries=50,
                           points=4, dtype=torch.float32, device="cuda")
    out_ref, grad_output, grads_ref = forward_and_grads(ms_deform_attn_reference, inputs32)
    value, shapes, starts, locations, weights = inputs32
    out, _, grads = forward_and_grads(cuda_kernel, (value.to(dtype), shapes, starts, locations, weights), grad_output)
    assert out.dtype == dtype and grads[0].dtype == dtype
    torch.testing.assert_close(out.float(), out_ref, rtol=tol, atol=tol)
    for name, grad, grad_ref in zip(("value", "sampling_locations", "attention_weights"), grads, grads_ref):
        scale = max(1.0, grad_ref.abs().max().item())
        torch.testing.assert_close(grad.float(), grad_ref, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


@gpu
@needs_cuda
def test_cuda_gradcheck_float64(cuda_kernel):
    value, shapes, starts, locations, weights = make_inputs([(5, 7), (3, 2)], batch=2, heads=2, channels=4, queries=4,
                                                            points=2, device="cuda", seed=5)
    # grad_value is accumulated with atomics, so two backward passes may differ in the last bits.
    assert torch.autograd.gradcheck(
        lambda v, loc, w: cuda_kernel(v, shapes, starts, loc, w),
        (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_()), eps=1e-6, atol=1e-6,
        nondet_tol=1e-12)


@gpu
@needs_cuda
def test_cuda_unaligned_value_view_uses_scalar_path(cuda_kernel):
    value, shapes, starts, locations, weights = make_inputs([(9, 6), (4, 3)], heads=2, channels=8, dtype=torch.float32,
                                                            device="cuda")
    # A view one element into its storage is not 16-byte aligned: the kernel must not use vector loads.
    storage = torch.zeros(value.numel() + 1, device="cuda")
    shifted = storage[1:].view_as(value).copy_(value)
    torch.testing.assert_close(cuda_kernel(shifted, shapes, starts, locations, weights),
                               ms_deform_attn_reference(value, shapes, starts, locations, weights), rtol=1e-5, atol=1e-5)


@gpu
@needs_cuda
def test_cuda_dispatch_and_cpu_agree(cuda_kernel, monkeypatch):
    monkeypatch.delenv("DINO_MSDA_IMPL", raising=False)
    assert selected_implementation("cuda", torch.bfloat16) == "cuda"
    inputs = make_inputs([(20, 33), (10, 17)], heads=8, channels=32, queries=100, dtype=torch.float32)
    out_cpu = ms_deform_attn(*inputs)
    out_cuda = ms_deform_attn(*(t.cuda() for t in inputs))
    torch.testing.assert_close(out_cuda.cpu(), out_cpu, rtol=1e-5, atol=1e-5)
