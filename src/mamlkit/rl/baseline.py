"""Returns, GAE and rllab's linear feature baseline, on padded ``[..., time]`` batches."""

from __future__ import annotations

import torch
from torch import Tensor


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """``R_t = sum_{l>=0} gamma^l r_{t+l}`` within each episode (``mask`` marks valid steps)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = (rewards[..., t] + gamma * running) * mask[..., t]
        out[..., t] = running
    return out


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalised advantage estimation; the value after the last valid step is 0 (rllab)."""
    next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], -1) * torch.cat(
        [mask[..., 1:], torch.zeros_like(mask[..., :1])], -1
    )
    deltas = (rewards + gamma * next_values - values) * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = (deltas[..., t] + gamma * lam * running) * mask[..., t]
        out[..., t] = running
    return out


def features(obs: Tensor) -> Tensor:
    """rllab's LinearFeatureBaseline features: obs, obs², t, t², t³, 1 with t = step / 100."""
    o = obs.clamp(-10, 10)
    t = torch.arange(obs.shape[-2], dtype=obs.dtype, device=obs.device) / 100.0
    t = t.expand(*obs.shape[:-1])[..., None]
    return torch.cat([o, o * o, t, t * t, t**3, torch.ones_like(t)], -1)


def fit_linear_baseline(obs: Tensor, returns: Tensor, mask: Tensor, reg: float = 1e-5) -> Tensor:
    """Ridge regression of returns on the features of one task's trajectories; returns the values.

    ``obs [trajs, time, d]``, ``returns`` and ``mask [trajs, time]``. As in rllab, the ridge
    coefficient grows 10x while the solution is not finite, and the normal equations are
    solved by least squares through the SVD (LAPACK's gelsd, as numpy's ``lstsq`` in rllab), on
    the CPU: torch's default CPU driver (gelsy) gave different last bits for the same input from
    one call to the next on these ill-conditioned systems, which RL amplified into different runs.
    """
    f = features(obs.double())[mask.bool()]
    y = returns.double()[mask.bool()]
    a, b = (f.T @ f).cpu(), (f.T @ y).cpu()
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    for _ in range(5):
        w = torch.linalg.lstsq(a + reg * eye, b[:, None], driver="gelsd").solution[:, 0]
        if torch.isfinite(w).all():
            break
        reg *= 10
    return (features(obs.double()) @ w.to(obs.device)).to(returns.dtype) * mask
