"""Task families for the RL experiment: how to sample tasks and roll a policy out on them.

A family's tasks are a tensor ``[n, k]`` (navigation: goals ``[n, 2]``; MuJoCo: goal velocity
or direction ``[n, 1]``); ``rollout`` returns padded ``Episodes [tasks, trajectories, time]``.
With ``oracle=True`` the observation also holds the task.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine.functional import FunctionalModel, Params
from .config import RLEnvConfig
from .families import MUJOCO, NAVIGATION
from .navigation import NavigationBatch, sample_goals
from .sampler import Episodes, policy_fn, rollout


class NavigationTasks:
    """2D navigation stepped in torch (no simulator)."""

    act_dim = 2

    def __init__(self, env: RLEnvConfig, oracle: bool = False):
        self.env, self.oracle = env, oracle
        self.obs_dim = 4 if oracle else 2

    def sample(self, n: int, g: torch.Generator) -> Tensor:
        return sample_goals(n, g, *self.env.goal_range)

    def rollout(
        self,
        fmodel: FunctionalModel,
        params: Params | list[Params],
        tasks: Tensor,
        trajectories: int,
        g: torch.Generator,
    ) -> Episodes:
        e = self.env
        scale = e.max_action if e.normalize_actions else 1.0
        batch = NavigationBatch(tasks, trajectories, e.max_action, e.goal_tolerance, self.oracle, scale)
        return rollout(policy_fn(fmodel, params), batch, e.horizon, g)


class MujocoTasks:
    """A MuJoCo task family through gymnasium's vector API (``env.num_envs`` copies)."""

    def __init__(self, env: RLEnvConfig, oracle: bool = False):
        from .vector_sampler import make_vector_env  # imports mujoco only for these families

        self.env, self.oracle = env, oracle
        self.family = MUJOCO[env.name]
        kwargs = {"frame_skip": env.frame_skip} if env.frame_skip else {}
        self.vec = make_vector_env(self.family.env_id, env.num_envs, env.asynchronous, env.processes, **kwargs)
        space = self.vec.single_observation_space
        self.obs_dim = space.shape[0] + (1 if oracle else 0)
        self.act_dim = self.vec.single_action_space.shape[0]

    def sample(self, n: int, g: torch.Generator) -> Tensor:
        u = torch.rand(n, 1, generator=g)
        high = self.family.high
        return u * high if high is not None else torch.where(u < 0.5, -1.0, 1.0)

    def rollout(
        self,
        fmodel: FunctionalModel,
        params: Params | list[Params],
        tasks: Tensor,
        trajectories: int,
        g: torch.Generator,
    ) -> Episodes:
        from .vector_sampler import indexed_policy, vector_rollout

        act = indexed_policy(fmodel, params)
        if self.oracle:
            act = _with_task_in_obs(act, tasks)
        task_dicts = [{self.family.key: float(v)} for v in tasks[:, 0]]
        seed = int(torch.randint(2**31 - 1, (), generator=g))
        ep = vector_rollout(self.vec, act, task_dicts, trajectories, self.env.horizon, g, seed)
        if self.oracle:
            extra = tasks[:, None, None, :].expand(*ep.obs.shape[:-1], tasks.shape[-1])
            ep = ep._replace(obs=torch.cat([ep.obs, extra], -1))
        return ep


def _with_task_in_obs(bind, tasks: Tensor):
    """The oracle's policy: each row's task appended to its observation."""

    def bind_oracle(task_index: Tensor):
        act, extra = bind(task_index), tasks[task_index]
        return lambda obs: act(torch.cat([obs, extra], -1))

    return bind_oracle


def make_tasks(env: RLEnvConfig, oracle: bool = False) -> NavigationTasks | MujocoTasks:
    return NavigationTasks(env, oracle) if env.name == NAVIGATION else MujocoTasks(env, oracle)
