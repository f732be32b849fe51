"""Batched rollouts in torch: every task of a meta-batch and every trajectory stepped together."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .baseline import discounted_returns, fit_linear_baseline, gae
from .navigation import NavigationBatch

PolicyFn = Callable[[Tensor], tuple[Tensor, Tensor]]


class Episodes(NamedTuple):
    """Padded trajectories: ``obs [tasks, trajs, time, d]``, ``actions [.., time, a]``,
    ``rewards`` and ``mask [tasks, trajs, time]`` (1 before and at the terminal step, then 0)."""

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor

    def returns(self) -> Tensor:
        """Undiscounted return of each trajectory ``[tasks, trajs]`` (the paper's metric)."""
        return (self.rewards * self.mask).sum(-1)


def task_noise(seeds: Tensor, shape: tuple, dtype=torch.float32, device="cpu") -> Tensor:
    """Standard normal noise ``[tasks, *shape]``, task ``i``'s from its own seed ``seeds[i]``."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds]
    ).to(device)


@torch.no_grad()
def rollout(policy: PolicyFn, env: NavigationBatch, noise: Tensor) -> Episodes:
    """Run ``noise.shape[2]`` steps of Gaussian actions ``mean + std * noise[:, :, t]`` (``noise``
    ``[tasks, trajectories, time, a]``); the environment clips them, the episode keeps the
    unclipped action (its log-probability is the policy's)."""
    horizon = noise.shape[2]
    obs = env.reset()
    alive = torch.ones(obs.shape[:-1], dtype=obs.dtype, device=obs.device)
    all_obs, all_actions, all_rewards, all_mask = [], [], [], []
    for _ in range(horizon):
        mean, log_std = policy(obs)
        action = mean + torch.exp(log_std) * noise[:, :, len(all_obs)]
        next_obs, reward, done = env.step(action)
        all_obs.append(obs)
        all_actions.append(action)
        all_rewards.append(reward * alive)
        all_mask.append(alive)
        alive = alive * (~done).to(alive.dtype)
        obs = next_obs
    stack = lambda xs: torch.stack(xs, 2)  # noqa: E731
    return Episodes(stack(all_obs), stack(all_actions), stack(all_rewards), stack(all_mask))


def advantages(ep: Episodes, gamma: float, lam: float, center: bool, reg: float = 1e-5) -> Tensor:
    """Per-task advantages ``[tasks, trajs, time]`` with a linear feature baseline fitted on each
    task's own trajectories, optionally normalised per task (rllab's ``center_adv``)."""
    returns = discounted_returns(ep.rewards, ep.mask, gamma)
    values = torch.stack([fit_linear_baseline(o, r, m, reg) for o, r, m in zip(ep.obs, returns, ep.mask)])
    adv = gae(ep.rewards, values, ep.mask, gamma, lam)
    if center:
        n = ep.mask.sum((1, 2), keepdim=True).clamp_min(1)
        mean = (adv * ep.mask).sum((1, 2), keepdim=True) / n
        var = ((adv - mean) ** 2 * ep.mask).sum((1, 2), keepdim=True) / n
        adv = (adv - mean) / (var.sqrt() + 1e-8) * ep.mask
    return adv
