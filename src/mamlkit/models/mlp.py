"""Fully connected networks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp(
    in_features: int, hidden: Sequence[int], out_features: int, activation: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    """``in -> hidden... -> out`` with ``activation`` between layers (the paper's sinusoid net: 1-40-40-1)."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), activation()]
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def official_init_(net: nn.Module, std: float = 0.01) -> nn.Module:
    """The official MAML code's fully connected initialisation: weights from a normal truncated
    at two standard deviations with ``std`` 0.01, biases zero."""
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(m.bias)
    return net
