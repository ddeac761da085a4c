"""Backbones through timm: ResNet (frozen BatchNorm) and Swin, returning multi-scale maps + masks.

The container is ``backbone.0`` so that parameter names match the official checkpoints
(``backbone.0.body.layer2.0.conv1.weight`` for ResNet, ``backbone.0.layers.0.blocks.0...`` for Swin).
"""
from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import FrozenBatchNorm2d
from .position_encoding import PositionEmbeddingSine

FeatureMaps = List[Tuple[torch.Tensor, torch.Tensor]]  # (feature [B, C, H, W], mask [B, H, W])


def _downsample_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of the padding mask ``[B, H, W]`` to a feature map's size."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


class ResNetBackbone(nn.Module):
    """timm ResNet as ``body``; ``return_interm_indices`` picks stages (0 = layer1 ... 3 = layer4).

    With ``frozen_bn`` every BatchNorm is a :class:`FrozenBatchNorm2d` and, as in the official
    recipe, the stem and ``layer1`` are not trained.
    """

    def __init__(self, name: str = "resnet50", return_interm_indices: Sequence[int] = (1, 2, 3),
                 frozen_bn: bool = True, train_stem_and_layer1: bool = False):
        super().__init__()
        model = timm.create_model(name, pretrained=False, features_only=True,
                                  out_indices=tuple(i + 1 for i in return_interm_indices))
        if frozen_bn:
            model = FrozenBatchNorm2d.convert(model)
        if not train_stem_and_layer1:
            for pname, p in model.named_parameters():
                if not any(f"layer{i}" in pname for i in (2, 3, 4)):
                    p.requires_grad_(False)
        self.body = model
        self.num_channels: List[int] = list(model.feature_info.channels())
        self.strides: List[int] = list(model.feature_info.reduction())

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> FeatureMaps:
        """``images [B, 3, H, W]``, ``mask [B, H, W]`` -> per level ``([B, C_l, H_l, W_l], [B, H_l, W_l])``."""
        return [(f, _downsample_mask(mask, f.shape[-2:])) for f in self.body(images)]


def _official_window_attention(block: nn.Module, x: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """Window attention of a timm Swin block with the official Swin detection semantics.

    NOTE: timm shifts then pads to a multiple of the window; the official Swin backbone used by DINO
    pads first, then shifts, and builds the shift mask on the padded map. The two differ whenever a
    map is not a multiple of the window, so the official order is reproduced here with timm's
    attention module (same parameters, same relative position bias).

    ``x``: ``[B, H, W, C]`` (already normed) -> ``[B, H, W, C]``.
    """
    from timm.models.swin_transformer import window_partition, window_reverse

    b, h, w, c = x.shape
    pad_b = (window - h % window) % window
    pad_r = (window - w % window) % window
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = h + pad_b, w + pad_r
    attn_mask = None
    if shift > 0:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        img_mask = torch.zeros((1, hp, wp, 1), device=x.device)
        region = 0
        for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                img_mask[:, hs, ws, :] = region
                region += 1
        mask_windows = window_partition(img_mask, (window, window)).view(-1, window * window)
        attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0).to(x.dtype)
    windows = window_partition(x, (window, window)).view(-1, window * window, c)
    windows = block.attn(windows, mask=attn_mask).view(-1, window, window, c)
    x = window_reverse(windows, (window, window), hp, wp)
    if shift > 0:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


class SwinBackbone(nn.Module):
    """timm Swin Transformer (``patch_embed`` + ``layers``) with one LayerNorm per returned stage.

    ``return_interm_indices`` picks stages 0..3; outputs are channels-first maps. Images are padded on
    the right/bottom to a multiple of the patch size, as the official backbone does.
    """

    def __init__(self, name: str = "swin_large_patch4_window12_384", return_interm_indices: Sequence[int] = (1, 2, 3),
                 drop_path_rate: float = 0.2, use_checkpoint: bool = False):
        super().__init__()
        model = timm.create_model(name, pretrained=False, num_classes=0, strict_img_size=False,
                                  always_partition=True, drop_path_rate=drop_path_rate)
        self.patch_embed = model.patch_embed
        self.layers = model.layers
        self.patch_size = model.patch_embed.patch_size[0]
        self.window_size = model.layers[0].blocks[0].window_size[0]
        self.return_interm_indices = list(return_interm_indices)
        self.use_checkpoint = use_checkpoint
        dims = [stage.blocks[0].norm1.normalized_shape[0] for stage in model.layers]
        for i in self.return_interm_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))
        self.num_channels: List[int] = [dims[i] for i in self.return_interm_indices]
        self.strides: List[int] = [self.patch_size * 2 ** i for i in self.return_interm_indices]
        # NOTE: a partial of a module-level function (not a lambda bound to the block) so that the
        # model survives pickle/torch.save and deepcopy (EMA) with each copy calling its own block.
        for stage in self.layers:
            for j, blk in enumerate(stage.blocks):
                shift = self.window_size // 2 if j % 2 == 1 else 0
                blk._attn = functools.partial(_official_window_attention, blk, window=self.window_size, shift=shift)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> FeatureMaps:
        h, w = images.shape[-2:]
        p = self.patch_size
        x = F.pad(images, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.patch_embed(x)  # [B, H/4, W/4, C] channels-last
        out = []
        for i, stage in enumerate(self.layers):
            x = stage.downsample(x)
            for blk in stage.blocks:
                x = checkpoint(blk, x, use_reentrant=False) if self.use_checkpoint and self.training else blk(x)
            if i in self.return_interm_indices:
                feat = getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous()
                out.append((feat, _downsample_mask(mask, feat.shape[-2:])))
        return out


class Backbone(nn.Module):
    """``backbone.0`` = the network; also computes each level's sine position embedding."""

    def __init__(self, body: nn.Module, hidden_dim: int, pe_temperature: float = 20):
        super().__init__()
        self.add_module("0", body)
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2, pe_temperature, pe_temperature, normalize=True)

    @property
    def body(self) -> nn.Module:
        return self._modules["0"]

    @property
    def num_channels(self) -> List[int]:
        return self.body.num_channels

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        """-> (features list, masks list, position embeddings list ``[B, hidden_dim, H_l, W_l]``)."""
        maps = self.body(images, mask)
        feats = [f for f, _ in maps]
        masks = [m for _, m in maps]
        pos = [self.position_embedding(m).to(f.dtype) for f, m in maps]
        return feats, masks, pos
