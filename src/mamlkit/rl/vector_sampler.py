"""Rollouts of gymnasium environments with the task API through gymnasium's vector API.

The episodes of a meta-batch (tasks × trajectories) run in chunks of ``num_envs`` parallel
environments, each set to its episode's task; the policy acts on the whole chunk at once with
each episode's own (adapted) parameters. ``asynchronous=True`` steps the environments in
worker processes (``AsyncVectorEnv``), which spreads MuJoCo over the cores.
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from ..engine.functional import FunctionalModel, Params
from . import envs  # noqa: F401  (registers mamlkit's environments)
from .sampler import Episodes

IndexedPolicy = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def make_vector_env(env_id: str, num_envs: int, asynchronous: bool = False, **kwargs) -> gym.vector.VectorEnv:
    """``num_envs`` copies of ``env_id``; the time limit is left to the sampler (``horizon``)."""
    fns = [lambda: gym.make(env_id, **kwargs)] * num_envs
    if asynchronous:
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def indexed_policy(fmodel: FunctionalModel, params: Params | list[Params]) -> IndexedPolicy:
    """The policy on ``obs [n, d]`` where row ``j`` belongs to task ``task_index[j]``."""
    if isinstance(params, dict):
        return lambda obs, task_index: fmodel(params, obs)
    stacked = {k: torch.stack([p[k] for p in params]) for k in params[0]}

    def act(obs: Tensor, task_index: Tensor):
        per_row = {k: v[task_index] for k, v in stacked.items()}
        return torch.func.vmap(fmodel)(per_row, obs)

    return act


@torch.no_grad()
def vector_rollout(
    vec: gym.vector.VectorEnv,
    policy: IndexedPolicy,
    tasks: list[dict],
    trajectories: int,
    horizon: int,
    generator: torch.Generator,
    seed: int,
) -> Episodes:
    """``trajectories`` episodes of ``horizon`` steps for each task -> padded ``Episodes``
    ``[tasks, trajectories, horizon, ...]``. Steps after an episode terminates are masked out
    (the vector env resets that copy on the next step; its data is ignored)."""
    n_envs = vec.num_envs
    total = len(tasks) * trajectories
    obs_dim = vec.single_observation_space.shape[0]
    act_dim = vec.single_action_space.shape[0]
    obs_buf = torch.zeros(total, horizon, obs_dim)
    act_buf = torch.zeros(total, horizon, act_dim)
    rew_buf = torch.zeros(total, horizon)
    mask_buf = torch.zeros(total, horizon)
    for start in range(0, total, n_envs):
        rows = np.arange(start, start + n_envs) % total  # the last chunk wraps; duplicates are dropped
        keep = torch.from_numpy(np.arange(start, start + n_envs) < total)
        task_index = torch.from_numpy(rows // trajectories)
        vec.set_attr("task", [tasks[i] for i in task_index.tolist()])
        obs, _ = vec.reset(seed=seed + start)
        alive = torch.ones(n_envs)
        for t in range(horizon):
            o = torch.as_tensor(obs, dtype=torch.float32)
            mean, log_std = policy(o, task_index)
            noise = torch.randn(mean.shape, generator=generator)
            action = mean + torch.exp(log_std) * noise
            obs, reward, terminated, _, _ = vec.step(action.numpy())
            sel = torch.from_numpy(rows[keep.numpy()])
            obs_buf[sel, t] = o[keep]
            act_buf[sel, t] = action[keep]
            rew_buf[sel, t] = (torch.as_tensor(reward, dtype=torch.float32) * alive)[keep]
            mask_buf[sel, t] = alive[keep]
            alive = alive * (1 - torch.as_tensor(terminated, dtype=torch.float32))
            if not alive.any():
                break
    shape = (len(tasks), trajectories, horizon)
    return Episodes(
        obs_buf.view(*shape, obs_dim), act_buf.view(*shape, act_dim), rew_buf.view(shape), mask_buf.view(shape)
    )
