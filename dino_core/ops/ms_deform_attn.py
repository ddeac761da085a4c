"""Multi-scale deformable attention core: the single dispatch point for all implementations.

Every caller in dino_core goes through :func:`ms_deform_attn`. It picks, per call, the fastest
implementation that supports the inputs' device and dtype:

* ``"cuda"``  – the compiled CUDA kernel from ``csrc/`` (float32/float16/bfloat16),
* ``"cpu"``   – the compiled C++ CPU kernel from ``csrc/``,
* ``"pytorch"`` – :func:`ms_deform_attn_reference`, pure PyTorch via ``grid_sample``; the
  reference for the tests and the fallback when nothing is compiled.
* while a graph is being exported (``torch.onnx.export``, ``torch.export``, ``torch.jit.trace``):
  :func:`ms_deform_attn_gather`, which reads the level sizes from the ``spatial_shapes`` tensor
  inside the graph instead of as Python ints, so the exported graph runs at any input size.

A kernel is used only for the value dtypes it supports (CPU: float32/float64; CUDA: float32,
float64, float16, bfloat16); other dtypes take the reference. ``DINO_MSDA_IMPL``
(``auto``/``cuda``/``cpu``/``pytorch``) forces a choice, e.g. for benchmarks. How the compiled
kernels are found (prebuilt ``dino_core._C`` or a JIT build) is described in ``dino_core.ops._ext``.
A compiled kernel whose first launch fails (e.g. "no kernel image" for a GPU the library was not built
for) is dropped with one warning, and the reference serves from then on (unless forced).
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# name -> callable(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
_KERNELS: Dict[str, Callable[..., torch.Tensor]] = {}
# name -> value dtypes the kernel supports; other dtypes fall back to the reference
_KERNEL_DTYPES: Dict[str, FrozenSet[torch.dtype]] = {}
_announced: set = set()
# kernel name -> why its first launch failed; the dispatcher then uses the reference instead
_failed_first_launch: Dict[str, str] = {}
_launched: set = set()


def register_kernel(name: str, fn: Callable[..., torch.Tensor], dtypes: Iterable[torch.dtype] = (torch.float32,)) -> None:
    """Register a compiled implementation for value tensors of ``dtypes`` (called by ``dino_core.ops._ext``)."""
    _KERNELS[name] = fn
    _KERNEL_DTYPES[name] = frozenset(dtypes)


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    level_shapes: Optional[Sequence[Tuple[int, int]]] = None,
) -> torch.Tensor:
    """Pure-PyTorch multi-scale deformable attention (bilinear, zero padding, align_corners=False).

    Args:
        value: ``[N, S, M, D]`` projected values, ``S = sum(H_l * W_l)``, ``M`` heads of ``D`` channels.
        spatial_shapes: ``[L, 2]`` int64 ``(H_l, W_l)`` per level.
        level_start_index: ``[L]`` int64 offset of each level in ``S`` (unused here, kept for the
            common signature).
        sampling_locations: ``[N, Lq, M, L, P, 2]`` ``(x, y)`` in ``[0, 1]`` of the level's map
            (values outside sample zeros).
        attention_weights: ``[N, Lq, M, L, P]`` softmax-normalised over ``L * P``.
        level_shapes: ``spatial_shapes`` as Python ints, when the caller has them (saves reading
            the tensor back from the device).

    Returns:
        ``[N, Lq, M * D]``, in the promoted dtype of ``value`` and ``sampling_locations``.
    """
    # grid_sample wants one dtype; promoting (bf16 values + fp32 locations -> fp32) keeps the locations exact
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    value, sampling_locations = value.to(dtype), sampling_locations.to(dtype)
    attention_weights = attention_weights.to(dtype)
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    if level_shapes is None:
        level_shapes = spatial_shapes.tolist()
    value_per_level = value.split([int(h) * int(w) for h, w in level_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(level_shapes):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        value_l = value_per_level[level].flatten(2).transpose(1, 2).reshape(n * m, d, int(h), int(w))
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N, Lq, M, L, P] -> [N*M, 1, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


def is_exporting() -> bool:
    """True while ``torch.export`` / ``torch.onnx.export`` / ``torch.jit.trace`` records a graph."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def ms_deform_attn_gather(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention as bilinear gathers from the flattened value (export form).

    The same sampling as :func:`ms_deform_attn_reference` (bilinear, zero padding,
    align_corners=False), but every level size comes from the ``spatial_shapes`` tensor and every
    read is one ``gather`` into ``value``'s token axis, so no shape is a Python int: a graph exported
    at one resolution stays correct at any other. Shapes as in :func:`ms_deform_attn_reference`.
    Agrees with it to float rounding (~1e-6), not bit for bit.
    """
    n, s, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    # [N, S, M, D] -> [N*M, S, D]; locations/weights -> [N*M, Lq, L, P(, 2)]
    value = value.permute(0, 2, 1, 3).reshape(n * m, s, d)
    locations = sampling_locations.permute(0, 2, 1, 3, 4, 5).reshape(n * m, lq, num_levels, num_points, 2)
    weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(n * m, lq, num_levels * num_points)
    heights = spatial_shapes[:, 0].view(1, 1, num_levels, 1)
    widths = spatial_shapes[:, 1].view(1, 1, num_levels, 1)
    starts = level_start_index.view(1, 1, num_levels, 1)
    x = locations[..., 0] * widths.to(locations.dtype) - 0.5  # pixel coordinates, [N*M, Lq, L, P]
    y = locations[..., 1] * heights.to(locations.dtype) - 0.5
    x0, y0 = x.floor(), y.floor()
    sampled = value.new_zeros(n * m, lq * num_levels * num_points, d)
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        xi, yi = x0 + dx, y0 + dy
        corner_weight = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
        inside = (xi >= 0) & (xi < widths) & (yi >= 0) & (yi < heights)
        xi = xi.long().clamp(min=0).minimum(widths - 1)
        yi = yi.long().clamp(min=0).minimum(heights - 1)
        index = (starts + yi * widths + xi).view(n * m, -1, 1).expand(-1, -1, d)
        corner = torch.gather(value, 1, index)
        sampled = sampled + corner * (corner_weight * inside.to(corner_weight.dtype)).view(n * m, -1, 1)
    out = (sampled.view(n * m, lq, num_levels * num_points, d) * weights[..., None]).sum(2)
    return out.view(n, m, lq, d).permute(0, 2, 1, 3).reshape(n, lq, m * d)


def available_implementations() -> List[str]:
    """Names of the implementations usable in this process, fastest first."""
    _load_compiled()
    return [k for k in ("cuda", "cpu") if k in _KERNELS] + ["pytorch"]


def get_implementation(name: str) -> Callable[..., torch.Tensor]:
    """The function behind ``name`` (one of :func:`available_implementations`), e.g. to benchmark it.

    Same signature as :func:`ms_deform_attn`; no dispatch, no logging.
    """
    _load_compiled()
    if name == "pytorch":
        return ms_deform_attn_reference
    if name not in _KERNELS:
        raise KeyError(f"MSDeformAttn implementation {name!r} is not available here; available: {available_implementations()}")
    return _KERNELS[name]


def selected_implementation(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """The implementation :func:`ms_deform_attn` uses for tensors on ``device`` of ``dtype``."""
    _load_compiled()
    forced = os.environ.get("DINO_MSDA_IMPL", "auto").lower()
    device_type = torch.device(device).type
    if forced not in ("auto", "cuda", "cpu", "pytorch"):
        raise ValueError(f"DINO_MSDA_IMPL={forced!r}: expected one of auto, cuda, cpu, pytorch")
    if forced == "pytorch":
        return "pytorch"
    if forced != "auto":
        if forced not in _KERNELS:
            raise RuntimeError(
                f"DINO_MSDA_IMPL={forced} but that kernel is not built here; "
                f"available: {available_implementations()}. Reinstall with the extension (see README, Kernels)."
            )
        if forced != device_type:
            raise RuntimeError(f"DINO_MSDA_IMPL={forced} cannot run on {device_type} tensors")
        if dtype not in _KERNEL_DTYPES[forced]:
            supported = sorted(str(d).replace("torch.", "") for d in _KERNEL_DTYPES[forced])
            raise RuntimeError(f"DINO_MSDA_IMPL={forced}: that kernel supports {supported}, not {dtype}")
        return forced
    if device_type in _KERNELS and dtype in _KERNEL_DTYPES[device_type] and device_type not in _failed_first_launch:
        return device_type
    return "pytorch"


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    level_shapes: Optional[Sequence[Tuple[int, int]]] = None,
) -> torch.Tensor:
    """Dispatch to the best implementation; shapes as in :func:`ms_deform_attn_reference`.

    ``level_shapes`` (``spatial_shapes`` as Python ints) spares the reference a read-back; the
    compiled kernels read ``spatial_shapes`` where they run.
    """
    if is_exporting():
        return ms_deform_attn_gather(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    impl = selected_implementation(value.device, value.dtype)
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if torch.compiler.is_compiling():  # traced into a graph: the kernel is one custom op, nothing to log
        return ms_deform_attn_reference(*args, level_shapes) if impl == "pytorch" else _KERNELS[impl](*args)
    key = (impl, value.device.type, value.dtype)
    if key not in _announced:
        _announced.add(key)
        log.info("MSDeformAttn: using the %s implementation on %s (%s)", impl, value.device.type,
                 str(value.dtype).replace("torch.", ""))
    if impl == "pytorch":
        return ms_deform_attn_reference(*args, level_shapes)
    if impl in _launched:
        return _KERNELS[impl](*args)
    try:
        out = _KERNELS[impl](*args)
    except RuntimeError as exc:
        # e.g. "no kernel image is available for execution on the device": a prebuilt library
        # without this GPU's architecture. Forced choices fail loudly; automatic ones fall back.
        if os.environ.get("DINO_MSDA_IMPL", "auto").lower() == impl:
            raise
        _failed_first_launch[impl] = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("MSDeformAttn: the %s kernel failed on its first launch (%s); using the PyTorch reference "
                    "on %s from now on. Rebuild the extension for this device (README, Kernels).",
                    impl, _failed_first_launch[impl], value.device.type)
        return ms_deform_attn_reference(*args, level_shapes)
    _launched.add(impl)
    return out


_compiled_loaded = False


def _load_compiled() -> None:
    """Import the compiled extension once, if it was built; absence is not an error."""
    global _compiled_loaded
    if _compiled_loaded:
        return
    _compiled_loaded = True
    try:
        from . import _ext  # noqa: F401  (registers kernels as a side effect)
    except ImportError as exc:  # not built: the reference is used
        log.debug("MSDeformAttn extension not available: %s", exc)
