"""Gaussian MLP policy with a learned state-independent log-std, and the losses built on it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..engine.functional import FunctionalModel, Params
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


def _mlp_layers(module: nn.Module) -> list[tuple[str, str, bool]] | None:
    """``(weight name, bias name, relu after)`` of a ``GaussianMLPPolicy`` whose ``mean`` is a
    Sequential of biased Linear and ReLU layers, else None."""
    if type(module) is not GaussianMLPPolicy or not isinstance(module.mean, nn.Sequential):
        return None
    layers: list[tuple[str, str, bool]] = []
    for i, sub in enumerate(module.mean):
        if isinstance(sub, nn.Linear) and sub.bias is not None:
            layers.append((f"mean.{i}.weight", f"mean.{i}.bias", False))
        elif isinstance(sub, nn.ReLU) and layers and not layers[-1][2]:
            layers[-1] = (*layers[-1][:2], True)
        else:
            return None
    return layers


class TaskPolicy:
    """The policy on ``obs [k, ..., d]`` of ``k`` tasks -> ``(mean, log_std)``, every task with
    its own parameters (``params``: one dict for all tasks, or a list with one per task).

    Per-task parameters are stacked once (detached: this is for sampling, not for gradients);
    a Gaussian MLP is then run as batched matmuls (``baddbmm``), anything else under
    ``torch.func.vmap`` over the stacked parameters (slower; BENCHMARKS.md, "Batched MuJoCo
    sampler"). ``tasks`` picks which of the stacked tasks ``obs`` belongs to.
    """

    def __init__(self, fmodel: FunctionalModel, params: Params | list[Params]):
        self.fmodel, self.shared = fmodel, isinstance(params, dict)
        if self.shared:
            self.params = params
            return
        self.stacked = {k: torch.stack([p[k].detach() for p in params]) for k in params[0]}
        layers = _mlp_layers(fmodel.module)
        if layers is not None and set(self.stacked) != {"log_std", *(n for w, b, _ in layers for n in (w, b))}:
            layers = None
        self.layers = layers

    def __call__(self, obs: Tensor, tasks: slice = slice(None)) -> tuple[Tensor, Tensor]:
        if self.shared:
            return self.fmodel(self.params, obs)
        if self.layers is None:
            chunk = {name: p[tasks] for name, p in self.stacked.items()}
            return torch.func.vmap(self.fmodel)(chunk, obs)
        h = obs.reshape(obs.shape[0], -1, obs.shape[-1])  # [k, episodes, d] for the batched matmuls
        for w, b, relu in self.layers:
            h = torch.baddbmm(self.stacked[b][tasks].unsqueeze(1), h, self.stacked[w][tasks].transpose(1, 2))
            if relu:
                h = torch.relu_(h)
        mean = h.reshape(*obs.shape[:-1], h.shape[-1])
        return mean, self.stacked["log_std"][tasks].view(-1, *[1] * (obs.dim() - 2), mean.shape[-1]).expand_as(mean)


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
