"""Helpers for the official-parity fixture (``tests/fixtures/dino_parity``): the weight fill rule."""
from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Dict

import torch

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "dino_parity"


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
