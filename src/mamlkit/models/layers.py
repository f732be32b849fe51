"""Layers written in plain tensor ops, so that their second-order gradients are exact under vmap."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BatchNorm(nn.Module):
    """Batch normalisation with batch statistics always (train and test), as in the paper.

    No running statistics. ``affine="bias"`` learns only the shift β (the official MAML code),
    ``"both"`` learns scale and shift, ``"none"`` neither. Works on ``[N, C]`` and ``[N, C, ...]``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: str = "bias"):
        super().__init__()
        if affine not in ("bias", "both", "none"):
            raise ValueError(f"affine must be 'bias', 'both' or 'none', got {affine!r}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features)) if affine == "both" else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine != "none" else None

    def forward(self, x: Tensor) -> Tensor:
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y
