"""ONNX export of a DINO detector whose graph runs at any batch size and image size.

    >>> from dino_core.export import export_onnx
    >>> export_onnx(model, "dino.onnx", height=512, width=512, with_postprocess=True)

What keeps the graph dynamic (the known ways DETR-family exports break):

* the level sizes of the multi-scale maps are read from the feature maps inside the graph; the
  per-level Python loops of the eager model (encoder reference points, encoder proposals) have an
  export form that computes the same values from the ``spatial_shapes`` tensor (bit-identical);
* multi-scale deformable attention is exported as bilinear gathers into the flattened value
  (:func:`dino_core.ops.ms_deform_attn_gather`), not as a custom CUDA op;
* ``topk`` keeps a fixed ``k`` (``num_queries``, ``num_select``), so no output shape depends on data.

Graph inputs: ``images [B, 3, H, W]`` float32 (normalised, zero-padded), ``mask [B, H, W]`` bool
(True on padding) and, with post-processing, ``target_sizes [B, 2]`` int64 ``(h, w)``. Outputs:
``pred_logits [B, nq, K]``, ``pred_boxes [B, nq, 4]`` (cx, cy, w, h in 0..1) and, with
post-processing, ``scores [B, k]``, ``labels [B, k]`` int64, ``boxes [B, k, 4]`` (x0, y0, x1, y1 in
pixels of ``target_sizes``), ``k = min(num_select, nq * K)``, exactly as :class:`PostProcess`.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import nn

from .postprocess import PostProcess

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 16
# the graph's smallest input side: the deepest level must keep at least one token per side and the
# encoder must offer at least num_queries tokens (checked per model in export_onnx)
MIN_SIDE = 64
MAX_SIDE = 4096


class ExportError(RuntimeError):
    """The model cannot be exported as asked (unsupported backbone, too small a size, bad opset)."""


class ExportableDINO(nn.Module):
    """``DINO`` in eval mode with tensor-only inputs and outputs (what an ONNX graph can hold)."""

    def __init__(self, model: nn.Module, postprocessor: Optional[PostProcess] = None,
                 with_anchors: bool = False):
        super().__init__()
        self.model = model
        self.postprocessor = postprocessor
        self.with_anchors = with_anchors

    def output_names(self) -> List[str]:
        names = ["pred_logits", "pred_boxes"]
        if self.postprocessor is not None:
            names += ["scores", "labels", "boxes"]
        if self.with_anchors:  # the encoder-selected anchors, for tests that align tied proposals
            names.append("anchors")
        return names

    def forward(self, images: torch.Tensor, mask: torch.Tensor,
                target_sizes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
        out = self.model(images, mask)
        result = [out["pred_logits"], out["pred_boxes"]]
        if self.postprocessor is not None:
            result += list(self.postprocessor.batched(out, target_sizes))
        if self.with_anchors:
            result.append(out["interm_outputs_for_matching_pre"]["pred_boxes"])
        return tuple(result)


def check_exportable(model: nn.Module) -> None:
    """Raise :class:`ExportError` saying why when ``model`` cannot be exported to a dynamic graph."""
    cfg = getattr(model, "config", None)
    if cfg is not None and cfg.backbone_kind == "swin":
        raise ExportError(
            f"backbone {cfg.backbone!r} (Swin) cannot be exported to a size-independent ONNX graph yet: its "
            "window attention pads each map to a multiple of the window and builds the shifted-window mask "
            "with Python arithmetic on the padded size, which the tracer would freeze at the export size. "
            "ResNet presets (dino_r50_4scale, dino_r50_5scale, dino_tiny) export.")


def min_side(model: nn.Module) -> int:
    """The smallest square input side whose encoder offers at least ``num_queries`` tokens."""
    levels = model.num_feature_levels
    strides = list(model.backbone.body.strides)
    strides += [strides[-1] * 2 ** (i + 1) for i in range(levels - len(strides))]
    side = MIN_SIDE
    while sum((-(-side // s)) ** 2 for s in strides) < model.num_queries:
        side += 32
    return side


def export_onnx(model: nn.Module, path: str | Path, height: int = 512, width: int = 512, opset: int = DEFAULT_OPSET,
                with_postprocess: bool = False, num_select: Optional[int] = None,
                with_anchors: bool = False, exporter: str = "torchscript") -> Path:
    """Export ``model`` (a :class:`~dino_core.DINO`) to ``path``, dynamic in batch, height and width.

    Args:
        height, width: the example input's size (any size works at run time, from
            :func:`min_side` up to ``MAX_SIDE``).
        opset: ONNX opset, >= 16.
        with_postprocess: add the ``target_sizes`` input and the ``scores``/``labels``/``boxes`` outputs.
        num_select: detections per image with post-processing (default: the model config's).
        with_anchors: also output ``anchors [B, nq, 4]`` (the encoder-selected proposals), for tests.
        exporter: ``"torchscript"`` (``torch.onnx.export(dynamo=False)``, the default) or ``"dynamo"``.

    Returns the path written. The graph is checked with ``onnx.checker`` before returning.
    """
    import onnx

    check_exportable(model)
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset}: the export needs opset >= {MIN_OPSET}")
    smallest = min_side(model)
    if min(height, width) < smallest:
        raise ExportError(f"export size {height}x{width}: both sides must be >= {smallest} for this model "
                          f"({model.num_queries} queries need that many encoder tokens)")
    cfg = getattr(model, "config", None)
    if num_select is None:
        num_select = cfg.num_select if cfg is not None else 300
    was_training = model.training
    model.eval()
    wrapper = ExportableDINO(model, PostProcess(num_select) if with_postprocess else None, with_anchors).eval()

    # batch of two, the second image padded: no size is 1 (which the exporter would specialise)
    images = torch.randn(2, 3, height, width)
    mask = torch.zeros(2, height, width, dtype=torch.bool)
    mask[1, height - height // 4:, :] = True
    mask[1, :, width - width // 4:] = True
    images[1][:, mask[1]] = 0.0
    args = [images, mask]
    batch = torch.export.Dim("batch", min=1, max=1024)
    h = torch.export.Dim("height", min=smallest, max=MAX_SIDE)
    w = torch.export.Dim("width", min=smallest, max=MAX_SIDE)
    dynamic = {"images": {0: batch, 2: h, 3: w}, "mask": {0: batch, 1: h, 2: w}}
    input_names = ["images", "mask"]
    if with_postprocess:
        args.append(torch.tensor([[height, width], [height - height // 4, width - width // 4]], dtype=torch.int64))
        dynamic["target_sizes"] = {0: batch}
        input_names.append("target_sizes")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                torch.onnx.export(wrapper, tuple(args), str(path), dynamo=True, opset_version=opset,
                                  input_names=input_names, output_names=wrapper.output_names(),
                                  dynamic_shapes=dynamic, external_data=False, optimize=True, verbose=False)
            elif exporter == "torchscript":
                axes = {"images": {0: "batch", 2: "height", 3: "width"}, "mask": {0: "batch", 1: "height", 2: "width"},
                        "target_sizes": {0: "batch"}}
                axes.update({name: {0: "batch"} for name in wrapper.output_names()})
                torch.onnx.export(wrapper, tuple(args), str(path), dynamo=False, opset_version=opset,
                                  input_names=input_names, output_names=wrapper.output_names(),
                                  dynamic_axes={k: v for k, v in axes.items() if k in input_names + wrapper.output_names()},
                                  do_constant_folding=True)
            else:
                raise ExportError(f"exporter {exporter!r}: expected 'torchscript' or 'dynamo'")
    finally:
        model.train(was_training)
    onnx.checker.check_model(str(path), full_check=True)
    return path
