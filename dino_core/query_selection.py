"""Two-stage proposals from the encoder and DINO's mixed query selection."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .ops import is_exporting


def token_grid(spatial_shapes: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Level, row and column of every flattened token, computed from the ``spatial_shapes`` tensor.

    The export form of the per-level Python loops (which would freeze the level sizes into an
    exported graph): ``spatial_shapes [L, 2]`` ``(H_l, W_l)``, ``num_tokens`` ``S = sum(H_l W_l)``
    -> ``level``, ``y``, ``x``, each ``[S]`` int64.
    """
    sizes = spatial_shapes.prod(1)
    starts = torch.cat((sizes.new_zeros((1,)), sizes.cumsum(0)[:-1]))
    token = torch.arange(num_tokens, device=spatial_shapes.device)
    level = (token[:, None] >= starts[None, :]).sum(1) - 1
    local = token - starts[level]
    width = spatial_shapes[level, 1]
    y = torch.div(local, width, rounding_mode="floor")
    return level, y, local - y * width


def _encoder_proposals_in_graph(padding_mask: torch.Tensor, spatial_shapes: torch.Tensor,
                                base_size: float) -> torch.Tensor:
    """The proposals of :func:`encoder_proposals` without Python level sizes (bit-identical to them)."""
    level, y, x = token_grid(spatial_shapes, padding_mask.shape[1])
    valid = ~padding_mask
    on_level = level[None, :, None] == torch.arange(spatial_shapes.shape[0], device=level.device)[None, None, :]
    # per image and level: valid rows (first column) and valid columns (first row), as the loop counts them
    valid_h = (valid[:, :, None] & (x == 0)[None, :, None] & on_level).sum(1)
    valid_w = (valid[:, :, None] & (y == 0)[None, :, None] & on_level).sum(1)
    grid_x = (x.to(torch.float32)[None] + 0.5) / valid_w[:, level]
    grid_y = (y.to(torch.float32)[None] + 0.5) / valid_h[:, level]
    wh = torch.ones_like(grid_x) * base_size * torch.pow(2.0, level.to(torch.float32))[None]
    return torch.stack((grid_x, grid_y, wh, wh), -1)


def encoder_proposals(memory: torch.Tensor, padding_mask: torch.Tensor, spatial_shapes: torch.Tensor,
                      base_size: float = 0.05,
                      level_shapes: Optional[Sequence[Tuple[int, int]]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One anchor per encoder token: its cell centre, size ``base_size * 2**level``.

    Args:
        memory: ``[bs, S, C]`` encoder output.
        padding_mask: ``[bs, S]`` bool, True on padding.
        spatial_shapes: ``[L, 2]`` ``(H_l, W_l)``.
        level_shapes: the same as Python ints, if known (otherwise read back from ``spatial_shapes``).

    Returns:
        ``memory`` with padded/invalid tokens zeroed ``[bs, S, C]`` and the proposals in logit space
        ``[bs, S, 4]`` (``inf`` where padded or too close to the border: such proposals never win).
    """
    if is_exporting():
        return _finish_proposals(memory, padding_mask, _encoder_proposals_in_graph(padding_mask, spatial_shapes, base_size))
    bs = memory.shape[0]
    proposals = []
    start = 0
    for level, (h, w) in enumerate(spatial_shapes.tolist() if level_shapes is None else level_shapes):
        mask_l = padding_mask[:, start:start + h * w].view(bs, h, w)
        valid_h = torch.sum(~mask_l[:, :, 0], 1)
        valid_w = torch.sum(~mask_l[:, 0, :], 1)
        grid_y, grid_x = torch.meshgrid(
            torch.linspace(0, h - 1, h, dtype=torch.float32, device=memory.device),
            torch.linspace(0, w - 1, w, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(bs, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(bs, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * base_size * (2.0 ** level)
        proposals.append(torch.cat((grid, wh), -1).view(bs, -1, 4))
        start += h * w
    return _finish_proposals(memory, padding_mask, torch.cat(proposals, 1))


def _finish_proposals(memory: torch.Tensor, padding_mask: torch.Tensor, proposals: torch.Tensor):
    """Logit-space proposals, ``inf`` (and zeroed memory) where padded or too close to the border."""
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
    proposals = proposals.masked_fill(~valid, float("inf"))
    memory = memory.masked_fill(padding_mask.unsqueeze(-1), 0.0)
    memory = memory.masked_fill(~valid, 0.0)
    return memory, proposals


def select_topk_proposals(class_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[bs, k]`` of the tokens with the highest max-class logit (``class_logits [bs, S, K]``)."""
    return torch.topk(class_logits.max(-1)[0], k, dim=1)[1]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [bs, S, D]`` gathered at ``index [bs, k]`` -> ``[bs, k, D]``."""
    return torch.gather(x, 1, index.unsqueeze(-1).repeat(1, 1, x.shape[-1]))
