"""Small building blocks shared by the model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box head); ``[..., in] -> [..., out]``."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < last else layer(x)
        return x


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, not parameters).

    Computes ``x * w / sqrt(var + eps) + (b - mean * w / sqrt(var + eps))`` with ``eps = 1e-5``,
    the formula of the official DINO backbone.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # present in BatchNorm2d checkpoints
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def folded(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)``, each ``[1, C, 1, 1]`` in ``dtype``: the affine map this layer applies.

        Folded in float32 from the buffers, then cast once, and cached until a buffer changes (a
        ``load_state_dict``, ``.to()`` or in-place edit), so a forward costs one multiply and one add.
        """
        key = (dtype,) + tuple((b.data_ptr(), b._version) for b in (self.weight, self.bias, self.running_mean,
                                                                     self.running_var))
        if getattr(self, "_folded_key", None) != key:
            with torch.no_grad():
                scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
                shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
            self._folded = (scale.to(dtype), shift.to(dtype))
            self._folded_key = key
        return self._folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` -> same shape and dtype (under autocast the conv's bf16 stays bf16).

        NOTE: the official layer computes in the buffers' float32 and so upcasts a bf16 input; here the
        folded affine map takes the input's dtype instead. Float32 results are unchanged.
        """
        scale, shift = self.folded(x.dtype)
        return x * scale + shift

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Replace every ``BatchNorm2d`` in ``module`` (recursively) by a frozen copy."""
        if isinstance(module, nn.BatchNorm2d):
            frozen = cls(module.num_features, module.eps)
            with torch.no_grad():
                if module.affine:
                    frozen.weight.copy_(module.weight)
                    frozen.bias.copy_(module.bias)
                if module.track_running_stats:
                    frozen.running_mean.copy_(module.running_mean)
                    frozen.running_var.copy_(module.running_var)
            return frozen
        for name, child in module.named_children():
            new = cls.convert(child)
            if new is not child:
                setattr(module, name, new)
        return module
