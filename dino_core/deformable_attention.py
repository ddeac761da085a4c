"""Multi-scale deformable attention (Deformable-DETR), the module around the dispatched core op."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .ops import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Each query attends to ``n_points`` sampled locations per head and level around its reference
    point (or inside its reference box). The sampling core goes through
    :func:`dino_core.ops.ms_deform_attn`, the single dispatch point for the compiled kernels.

    Args:
        d_model: hidden size ``C``; must be divisible by ``n_heads``.
        n_levels: feature levels ``L``.
        n_heads: attention heads ``M``.
        n_points: sampling points ``P`` per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start on a ring of directions (one per head), growing with the point index."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        level_shapes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: ``[N, Lq, C]`` (content + position).
            reference_points: ``[N, Lq, L, 2]`` points ``(x, y)`` or ``[N, Lq, L, 4]`` boxes
                ``(cx, cy, w, h)``, normalised to ``[0, 1]`` of the padded map.
            value: ``[N, S, C]`` flattened multi-level features, ``S = sum(H_l * W_l)``.
            spatial_shapes: ``[L, 2]`` int64 ``(H_l, W_l)``.
            level_start_index: ``[L]`` int64.
            padding_mask: ``[N, S]`` bool, True on padding (those values are zeroed).
            level_shapes: ``spatial_shapes`` as Python ints, if known (no read-back from the device).

        Returns:
            ``[N, Lq, C]``.
        """
        n, len_q, _ = query.shape
        _, len_in, _ = value.shape
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, len_in, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, len_q, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, len_q, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, len_q, self.n_heads, self.n_levels, self.n_points)
        # NOTE: locations and weights stay float32 under autocast (the kernels take them so, the
        # reference promotes): a location in [0, 1] rounded to bfloat16 is off by up to 0.33 px at
        # stride 8 of a 1333-px image. Only the small offsets come out of a low-precision matmul.
        coord_dtype = torch.promote_types(reference_points.dtype, torch.float32)
        offsets, weights = offsets.to(coord_dtype), weights.to(coord_dtype)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4, got {reference_points.shape[-1]}")
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, level_shapes)
        return self.output_proj(out)
