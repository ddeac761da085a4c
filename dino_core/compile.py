"""Regional ``torch.compile`` of the transformer: each encoder and decoder layer compiled on its own.

The layers are where the small elementwise ops of a step are (projections, norms, softmax, the
sampling-location arithmetic); compiled one by one, a graph stays small, compiles once per layer
shape, and the MSDeformAttn kernel inside is one custom op (``dino_core::ms_deform_attn``) rather than
a graph break. The backbone (cuDNN convolutions), query selection (top-k) and the criterion (Hungarian
matching on the host) stay eager. Whether it pays depends on the device: measure with
``benchmarks/bench_step.py --compile``.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .transformer import DeformableDecoderLayer, DeformableEncoderLayer


def compile_transformer_layers(model: nn.Module, **compile_kwargs: Any) -> int:
    """Compile every encoder and decoder layer of ``model`` in place; returns how many.

    ``compile_kwargs`` go to :meth:`torch.nn.Module.compile` (``mode``, ``dynamic``, ``backend``, ...).
    Parameters and ``state_dict`` keys are unchanged.
    """
    layers = [m for m in model.modules() if isinstance(m, (DeformableEncoderLayer, DeformableDecoderLayer))]
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)
