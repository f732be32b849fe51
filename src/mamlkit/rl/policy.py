"""Gaussian MLP policy with a learned state-independent log-std, and the losses built on it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..models import mlp


class GaussianMLPPolicy(nn.Module):
    """``obs -> (mean, log_std)``; works through ``MAML``'s functional call like any module.

    Initialised like rllab: Glorot-uniform weights, zero biases, std 1 (``init_log_std = 0``).
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (100, 100), init_log_std: float = 0.0):
        super().__init__()
        self.mean = mlp(obs_dim, hidden, act_dim)
        for m in self.mean.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(init_log_std)))

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.mean(obs)
        return mean, self.log_std.expand_as(mean)


def log_prob(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tensor:
    """Log density of a diagonal Gaussian, summed over the action dimension."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def kl(old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor]) -> Tensor:
    """KL(old || new) of diagonal Gaussians, summed over the action dimension."""
    (m0, s0), (m1, s1) = old, new
    return (s1 - s0 + (torch.exp(2 * s0) + (m0 - m1).pow(2)) / (2 * torch.exp(2 * s1)) - 0.5).sum(-1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def reinforce_loss(outputs: tuple[Tensor, Tensor], targets: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """The inner loss (vanilla policy gradient): ``-mean_t log pi(a_t|s_t) A_t`` over valid steps.

    ``targets = (actions, advantages, mask)``: the pytree MAML passes through its inner loop.
    """
    actions, advantages, mask = targets
    return -masked_mean(log_prob(*outputs, actions) * advantages, mask)
