"""Sine position encoding of a padded feature map (DETR style, separate temperatures for H and W)."""
from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Normalised 2-D sine/cosine embedding of the valid (non-padded) region.

    DINO uses ``num_pos_feats = hidden_dim // 2`` and temperature 20 for both axes.

    Forward: ``mask [B, H, W]`` bool (True = padding) -> ``[B, 2 * num_pos_feats, H, W]`` float32,
    channels ordered ``(y features, x features)``.
    """

    def __init__(self, num_pos_feats: int = 128, temperature_h: float = 20, temperature_w: float = 20,
                 normalize: bool = True, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.normalize = normalize
        self.scale = scale

    def _frequencies(self, temperature: float, device: torch.device) -> torch.Tensor:
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        return temperature ** (2 * (dim_t // 2) / self.num_pos_feats)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        pos_x = x_embed[:, :, :, None] / self._frequencies(self.temperature_w, mask.device)
        pos_y = y_embed[:, :, :, None] / self._frequencies(self.temperature_h, mask.device)
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sine_embed_boxes(boxes: torch.Tensor, num_feats: int = 128) -> torch.Tensor:
    """Sine embedding of normalised boxes/points for the decoder's query positions.

    Args:
        boxes: ``[nq, bs, 2]`` ``(x, y)`` or ``[nq, bs, 4]`` ``(x, y, w, h)`` in ``[0, 1]``.
        num_feats: features per coordinate (``hidden_dim // 2``).

    Returns:
        ``[nq, bs, 2 * num_feats]`` or ``[nq, bs, 4 * num_feats]``, ordered ``(y, x[, w, h])``.
    """
    scale = 2 * math.pi
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)

    def embed(coord: torch.Tensor) -> torch.Tensor:
        pos = (coord * scale)[:, :, None] / dim_t
        return torch.stack((pos[:, :, 0::2].sin(), pos[:, :, 1::2].cos()), dim=3).flatten(2)

    if boxes.size(-1) == 2:
        return torch.cat((embed(boxes[:, :, 1]), embed(boxes[:, :, 0])), dim=2)
    if boxes.size(-1) == 4:
        return torch.cat([embed(boxes[:, :, i]) for i in (1, 0, 2, 3)], dim=2)
    raise ValueError(f"sine_embed_boxes: last dim must be 2 or 4, got {boxes.size(-1)}")
