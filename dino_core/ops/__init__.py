"""Low-level operators of dino_core (multi-scale deformable attention core)."""
from .ms_deform_attn import (available_implementations, get_implementation, is_exporting, ms_deform_attn,
                             ms_deform_attn_gather, ms_deform_attn_reference, selected_implementation)

__all__ = [
    "ms_deform_attn", "ms_deform_attn_reference", "available_implementations", "selected_implementation",
    "get_implementation", "ms_deform_attn_gather", "is_exporting",
]
