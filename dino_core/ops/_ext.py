"""Loads the compiled MSDeformAttn kernels (``csrc/``) and registers them with the dispatcher.

Imported once by :mod:`dino_core.ops.ms_deform_attn`. Where the library comes from:

1. ``dino_core._C``, built at install time by ``setup.py`` (CPU kernel, plus CUDA kernels when the
   install saw CUDA or ``FORCE_CUDA=1``);
2. when a GPU is visible but ``dino_core._C`` is missing or CPU-only: a one-time JIT build of
   ``csrc/`` with ``torch.utils.cpp_extension.load`` (needs nvcc and a source checkout; cached in
   ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``; ``DINO_MSDA_JIT=0`` disables it).

Raises ImportError when neither is usable; the dispatcher then uses the PyTorch reference.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from .ms_deform_attn import register_kernel

log = logging.getLogger(__name__)

_CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _jit_build_cuda() -> Optional[ModuleType]:
    """Compile csrc/ with CUDA on first use; None (with a warning) when that is not possible."""
    if os.environ.get("DINO_MSDA_JIT", "1") == "0":
        return None
    build_config = _CSRC_DIR / "build.py"
    if not build_config.is_file():
        log.warning("MSDeformAttn: a GPU is visible but no CUDA kernels were prebuilt and csrc/ is not "
                    "next to this package (installed from a wheel?); using the PyTorch reference on GPU")
        return None
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        log.warning("MSDeformAttn: a GPU is visible but no CUDA kernels were prebuilt and nvcc was not found "
                    "(set CUDA_HOME); using the PyTorch reference on GPU")
        return None
    spec = importlib.util.spec_from_file_location("dino_msda_build", build_config)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build.ensure_cuda_arch_list(for_visible_gpus=True)
    flags = build.compile_args(with_cuda=True)
    log.warning("MSDeformAttn: compiling the CUDA kernels now (first use only, takes minutes; "
                "reinstall with CUDA to prebuild them, or DINO_MSDA_JIT=0 to skip)")
    try:
        return cpp_extension.load(
            name="dino_core_msda_jit",
            sources=build.sources(with_cuda=True),
            extra_cflags=flags["cxx"],
            extra_cuda_cflags=flags["nvcc"],
            extra_ldflags=build.link_args(),
            extra_include_paths=[str(build.CSRC_DIR)],
            with_cuda=True,
        )
    except Exception as exc:  # a failed JIT build must not take the reference path down with it
        log.warning("MSDeformAttn: JIT build of the CUDA kernels failed (%s); using the PyTorch reference on GPU", exc)
        return None


def _load_library() -> ModuleType:
    try:
        from dino_core import _C as prebuilt
    except ImportError as exc:
        prebuilt, prebuilt_error = None, exc
    if torch.cuda.is_available() and (prebuilt is None or not prebuilt.with_cuda):
        jit = _jit_build_cuda()
        if jit is not None:
            return jit
    if prebuilt is None:
        raise ImportError(f"dino_core._C is not built ({prebuilt_error})")
    return prebuilt


_lib = _load_library()


# The kernels as PyTorch operators (dino_core::ms_deform_attn and its backward): torch.compile
# and torch.export see one opaque op with a shape-only fake implementation, not a graph break.
@torch.library.custom_op("dino_core::ms_deform_attn", mutates_args=())
def _forward_op(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    return _lib.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@_forward_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    n, _, heads, channels = value.shape
    return value.new_empty(n, sampling_locations.shape[1], heads * channels)


@torch.library.custom_op("dino_core::ms_deform_attn_backward", mutates_args=())
def _backward_op(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                 sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                 grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_value, grad_locations, grad_weights = _lib.backward(value, spatial_shapes, level_start_index,
                                                             sampling_locations, attention_weights, grad_output)
    return grad_value, grad_locations, grad_weights


@_backward_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    grad_value, grad_locations, grad_weights = _backward_op(*ctx.saved_tensors, grad_output.contiguous())
    return grad_value, None, None, grad_locations, grad_weights


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def ms_deform_attn_compiled(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The compiled kernel, differentiable; shapes as in :func:`ms_deform_attn_reference`.

    Locations and weights are computed in float32 (float64 for float64 values) whatever the value
    dtype, so half-precision values do not cost sampling precision; autograd casts their
    gradients back.
    """
    coord_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    return _forward_op(
        value,
        spatial_shapes.long(),
        level_start_index.long(),
        sampling_locations.to(coord_dtype),
        attention_weights.to(coord_dtype),
    )


register_kernel("cpu", ms_deform_attn_compiled, _CPU_DTYPES)
if _lib.with_cuda:
    register_kernel("cuda", ms_deform_attn_compiled, _CUDA_DTYPES)
log.debug("MSDeformAttn: compiled kernels loaded from %s (cuda=%s)", _lib.__name__, _lib.with_cuda)
