"""Helpers for the official-parity fixture (``tests/fixtures/dino_parity``): the weight fill rule."""
from __future__ import annotations

import math
import zlib
from typing import Dict

import torch

from support import FIXTURES

FIXTURE_DIR = FIXTURES / "dino_parity"


def load_fixture(name: str = "r50_4scale") -> Dict:
    return torch.load(FIXTURE_DIR / f"{name}.pt", weights_only=True)


def fill_value(salt: str, canonical_key: str, shape) -> torch.Tensor:
    """The fixture README's deterministic weight for one tensor."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{salt}:{canonical_key}".encode()))
    u = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    if len(shape) >= 2:
        value = u * math.sqrt(3 / math.prod(shape[1:]))
    elif canonical_key.endswith("running_var"):
        value = 1 + 0.1 * (u + 1) / 2
    elif canonical_key.endswith("running_mean"):
        value = 0.1 * u
    elif canonical_key.endswith("weight"):
        value = 1 + 0.1 * u
    else:
        value = 0.1 * u
    return value.to(torch.float32)


def official_state_dict(fixture: Dict) -> Dict[str, torch.Tensor]:
    """The official-layout state dict the fixture was computed with."""
    cache: Dict[str, torch.Tensor] = {}
    out = {}
    for key, shape, canonical, dtype in fixture["keys"]:
        if dtype.startswith("float"):
            if canonical not in cache:
                cache[canonical] = fill_value(fixture["salt"], canonical, list(shape))
            out[key] = cache[canonical]
        else:
            out[key] = torch.zeros(shape, dtype=getattr(torch, dtype))
    return out


def all_proposal_boxes(model, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every encoder token's unrefined proposal, sigmoid ``(cx, cy, w, h)`` ``[B, S, 4]``.

    A proposal is a function of its token's cell and level only (no weights), and no two tokens share
    one, so a proposal box names its token: this is how a recorded selection becomes token indices.
    """
    from dino_core.query_selection import encoder_proposals

    with torch.no_grad():
        srcs, masks, _ = model._multiscale_inputs(images, mask)
    shapes = torch.as_tensor([tuple(src.shape[-2:]) for src in srcs], dtype=torch.long)
    mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
    _, proposals = encoder_proposals(torch.zeros(*mask_flat.shape, 1), mask_flat, shapes)
    return proposals.sigmoid()


def token_indices(all_boxes: torch.Tensor, selected_boxes: torch.Tensor) -> torch.Tensor:
    """The token index ``[B, k]`` of each selected proposal ``[B, k, 4]`` among ``all_boxes [B, S, 4]``."""
    dist = torch.cdist(selected_boxes.double(), all_boxes.double())
    nearest, index = dist.min(-1)
    assert nearest.max() <= 1e-6, f"a selected proposal is no encoder token's (distance {nearest.max():.3g})"
    for row in index:
        assert row.unique().numel() == row.numel(), "one token selected twice"
    return index


def unmatched_detections(mine: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], score_atol: float,
                         box_atol: float) -> int:
    """How many detections of ``ref`` find no partner in ``mine``, pairing them one-to-one.

    Two detections pair when they have the same label, scores within ``score_atol`` and every box
    coordinate within ``box_atol``: a comparison of the two lists as multisets, since detections with
    tied scores come out of the top-k in an undefined order. A detection at the score cut-off (within
    ``score_atol`` of the lowest kept score) may be exchanged for a tied one that was not kept, so
    those are not counted.
    """
    from scipy.optimize import linear_sum_assignment

    compatible = ((mine["labels"][:, None] == ref["labels"][None, :])
                  & ((mine["scores"][:, None] - ref["scores"][None, :]).abs() <= score_atol)
                  & ((mine["boxes"][:, None, :] - ref["boxes"][None, :, :]).abs().amax(-1) <= box_atol))
    rows, cols = (torch.as_tensor(i) for i in linear_sum_assignment((~compatible).double().numpy()))
    paired = torch.zeros(len(ref["scores"]), dtype=torch.bool)
    paired[cols[compatible[rows, cols]]] = True
    at_cutoff = ref["scores"] <= ref["scores"].min() + score_atol
    return int((~paired & ~at_cutoff).sum())
