"""Export to ordinary ``nn.Linear`` layers, shared by the parameterizations."""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def dense_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` with ``weight`` (out, in) and ``bias``, on their device and in their dtype."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear
