"""Two-stage proposals from the encoder and DINO's mixed query selection."""
from __future__ import annotations

import torch


def encoder_proposals(memory: torch.Tensor, padding_mask: torch.Tensor, spatial_shapes: torch.Tensor,
                      base_size: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """One anchor per encoder token: its cell centre, size ``base_size * 2**level``.

    Args:
        memory: ``[bs, S, C]`` encoder output.
        padding_mask: ``[bs, S]`` bool, True on padding.
        spatial_shapes: ``[L, 2]`` ``(H_l, W_l)``.

    Returns:
        ``memory`` with padded/invalid tokens zeroed ``[bs, S, C]`` and the proposals in logit space
        ``[bs, S, 4]`` (``inf`` where padded or too close to the border: such proposals never win).
    """
    bs = memory.shape[0]
    proposals = []
    start = 0
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
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
    proposals = torch.cat(proposals, 1)
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
