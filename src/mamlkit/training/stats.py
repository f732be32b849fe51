"""Summary statistics for evaluation."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def mean_ci(values: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    """Mean and 95% confidence half-width (1.96 · std / √n, normal approximation) along ``dim``;
    the half-width is nan for a single value, where it is undefined."""
    values = values.double()
    n = values.shape[dim]
    std = values.std(dim=dim, unbiased=True) if n > 1 else torch.full_like(values.mean(dim), math.nan)
    return values.mean(dim), 1.96 * std / math.sqrt(n)
