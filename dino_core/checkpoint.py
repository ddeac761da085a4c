"""Loading (and exporting) checkpoints in the official DINO layout, with class transfer.

The official ``checkpoint0011_4scale.pth`` etc. load unchanged: ``{"model": state_dict}`` with
optional ``module.`` prefixes; official Swin keys are converted to the timm layout used here.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import nn

log = logging.getLogger(__name__)

# parameters whose first dimension is the class dimension (re-initialised or remapped on transfer)
CLASS_HEAD_PATTERNS = (
    re.compile(r"^class_embed\.\d+\.(weight|bias)$"),
    re.compile(r"^transformer\.decoder\.class_embed\.\d+\.(weight|bias)$"),
    re.compile(r"^transformer\.enc_out_class_embed\.(weight|bias)$"),
)
LABEL_ENC_KEY = "label_enc.weight"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message says what and what to do."""


@dataclass
class LoadReport:
    """What :func:`load_official_state_dict` did."""

    loaded: List[str] = field(default_factory=list)
    reinitialized: List[str] = field(default_factory=list)
    remapped: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)   # in the checkpoint, not used
    missing: List[str] = field(default_factory=list)   # in the model, not in the checkpoint (non-strict)

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)} tensors, re-initialised {len(self.reinitialized)}"
                f"{' ' + str(sorted(set(self.reinitialized))[:6]) if self.reinitialized else ''}, "
                f"class rows remapped in {len(self.remapped)}, skipped {len(self.skipped)}"
                f"{' ' + str(self.skipped[:6]) if self.skipped else ''}, missing {len(self.missing)}")


def read_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Read a ``.pth`` safely (``weights_only=True``): tensors and plain containers only."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist; give the path of a DINO .pth file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path!r}: it contains pickled Python objects (code), not only tensors "
            f"({str(exc).splitlines()[0][:200]}). Only plain state_dict checkpoints are accepted; re-save it as "
            f"torch.save({{'model': model.state_dict()}}, path) from a trusted environment.") from None
    except Exception as exc:  # truncated/corrupt file
        raise CheckpointError(f"cannot read checkpoint {path!r}: {exc}") from None
    return obj


def unwrap_state_dict(obj) -> Dict[str, torch.Tensor]:
    """``{"model": sd}`` / ``{"state_dict": sd}`` / ``{"module": sd}`` -> sd, ``module.`` prefixes stripped."""
    for key in ("model", "state_dict", "module", "ema_model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, expected a state_dict (dict of tensors)")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


_SWIN_DOWNSAMPLE = re.compile(r"^backbone\.0\.layers\.(\d+)\.downsample\.")


def swin_official_to_timm(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official Swin keys (downsample at the *end* of stage i) -> timm (at the *start* of stage i+1).

    Non-persistent buffers (``relative_position_index``, ``attn_mask``) are dropped.
    """
    if "backbone.0.layers.0.downsample.reduction.weight" not in sd:
        return sd
    out = {}
    for k, v in sd.items():
        if k.startswith("backbone.0.") and ("relative_position_index" in k or k.endswith("attn_mask")):
            continue
        k = _SWIN_DOWNSAMPLE.sub(lambda m: f"backbone.0.layers.{int(m.group(1)) + 1}.downsample.", k)
        out[k] = v
    return out


def swin_timm_to_official(sd: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`swin_official_to_timm`, restoring ``relative_position_index`` buffers."""
    out = {}
    for k, v in sd.items():
        k = _SWIN_DOWNSAMPLE.sub(lambda m: f"backbone.0.layers.{int(m.group(1)) - 1}.downsample.", k)
        out[k] = v
        if k.endswith("attn.relative_position_bias_table"):
            module = model.get_submodule(_SWIN_DOWNSAMPLE.sub(
                lambda m: f"backbone.0.layers.{int(m.group(1))}.downsample.", k)[: -len(".relative_position_bias_table")])
            out[k.replace("relative_position_bias_table", "relative_position_index")] = module.relative_position_index.clone()
    return out


def export_official_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's weights in the official DINO key layout (fp32, CPU), ready for ``torch.save``."""
    sd = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
          for k, v in model.state_dict().items()}
    if getattr(getattr(model, "config", None), "backbone_kind", "resnet") == "swin":
        sd = swin_timm_to_official(sd, model)
    return sd


def _is_class_param(key: str) -> bool:
    return any(p.match(key) for p in CLASS_HEAD_PATTERNS)


def load_official_state_dict(
    model: nn.Module,
    state_dict_or_path,
    strict: bool = True,
    class_map: Optional[Mapping[int, int]] = None,
) -> LoadReport:
    """Load an official-layout DINO checkpoint into ``model``.

    Args:
        model: a model from :func:`dino_core.build_model`.
        state_dict_or_path: a path (read with ``weights_only=True``) or a (wrapped) state dict.
        strict: every model tensor must be provided and every checkpoint tensor used (except the
            class-dependent ones, see below); otherwise :class:`CheckpointError` lists missing,
            unexpected and mis-shaped keys.
        class_map: ``{checkpoint_class_id: model_class_id}``. The class heads and the denoising
            label embedding are then re-initialised and the rows of mapped classes copied (e.g.
            Objects365 -> COCO). Without it, class-dependent tensors whose shape differs from the
            model's (a different ``num_classes``) are re-initialised and everything else is loaded.

    Returns:
        a :class:`LoadReport`; its one-line summary is also logged.
    """
    raw = read_checkpoint(state_dict_or_path) if isinstance(state_dict_or_path, (str, os.PathLike)) else state_dict_or_path
    sd = swin_official_to_timm(unwrap_state_dict(raw))
    target = model.state_dict()
    report = LoadReport()
    new_sd: Dict[str, torch.Tensor] = {}
    mis_shaped = []
    for key, value in sd.items():
        if key not in target:
            report.skipped.append(key)
            continue
        want = target[key]
        class_dependent = _is_class_param(key) or key == LABEL_ENC_KEY
        if class_dependent and class_map is not None:
            new_sd[key] = _remap_rows(value, want, class_map, key)
            report.remapped.append(key)
        elif value.shape != want.shape:
            if class_dependent:
                new_sd[key] = want.clone()  # keep the fresh initialisation
                report.reinitialized.append(key)
            else:
                mis_shaped.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(want.shape)}")
        else:
            new_sd[key] = value.to(want.dtype)
            report.loaded.append(key)
    mis_shaped_keys = {m.split(":")[0] for m in mis_shaped}
    report.missing = [k for k in target if k not in new_sd and k not in mis_shaped_keys]
    unexpected = [k for k in report.skipped]
    if mis_shaped or (strict and (report.missing or unexpected)):
        parts = []
        if report.missing:
            parts.append(f"missing {len(report.missing)}: {report.missing[:10]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {unexpected[:10]}")
        if mis_shaped:
            parts.append(f"mis-shaped {len(mis_shaped)}: {mis_shaped[:10]}")
        raise CheckpointError(
            "checkpoint does not match the model (" + "; ".join(parts) + "). Check the preset "
            "(R50 vs Swin-L, 4- vs 5-scale) and num_classes; pass strict=False to load what fits.")
    model.load_state_dict(new_sd, strict=False)
    log.info("load_official_state_dict: %s", report.summary())
    return report


def _remap_rows(value: torch.Tensor, fresh: torch.Tensor, class_map: Mapping[int, int], key: str) -> torch.Tensor:
    """Fresh tensor with rows ``dst`` copied from checkpoint rows ``src`` for each ``src -> dst``."""
    out = fresh.clone()
    for src, dst in class_map.items():
        if not (0 <= src < value.shape[0]) or not (0 <= dst < out.shape[0]):
            raise CheckpointError(
                f"class_map entry {src} -> {dst} is out of range for {key} "
                f"(checkpoint has {value.shape[0]} rows, model {out.shape[0]})")
        out[dst] = value[src].to(out.dtype)
    return out
