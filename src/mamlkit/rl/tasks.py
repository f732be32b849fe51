"""Task families for the RL experiment: how to sample tasks and roll a policy out on them.

A family's tasks are a tensor ``[n, k]`` (navigation: goals ``[n, 2]``; MuJoCo: goal velocity
or direction ``[n, 1]``); ``rollout`` returns padded ``Episodes [tasks, trajectories, time]``.
With ``oracle=True`` the observation also holds the task.

Each task's episodes are drawn from its own seed (``seeds[i]``: its action noise and its
simulator's initial states), so a task's episodes do not depend on which other tasks share
the call: the processes of a torchrun each sample their share of a meta-batch and together
sample what one process would.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine.functional import FunctionalModel, Params
from .config import RLEnvConfig
from .families import MUJOCO, NAVIGATION
from .navigation import NavigationBatch, sample_goals
from .policy import TaskPolicy
from .sampler import Episodes, rollout, task_noise


class NavigationTasks:
    """2D navigation stepped in torch (no simulator)."""

    act_dim = 2

    def __init__(self, env: RLEnvConfig, oracle: bool = False):
        self.env, self.oracle = env, oracle
        self.obs_dim = 4 if oracle else 2

    def sample(self, n: int, g: torch.Generator) -> Tensor:
        return sample_goals(n, g, *self.env.goal_range)

    def rollout(
        self, fmodel: FunctionalModel, params: Params | list[Params], tasks: Tensor, trajectories: int, seeds: Tensor
    ) -> Episodes:
        e = self.env
        scale = e.max_action if e.normalize_actions else 1.0
        batch = NavigationBatch(tasks, trajectories, e.max_action, e.goal_tolerance, self.oracle, scale)
        noise = task_noise(seeds, (trajectories, e.horizon, self.act_dim), tasks.dtype, tasks.device)
        return rollout(TaskPolicy(fmodel, params), batch, noise)


class MujocoTasks:
    """A MuJoCo task family: every episode of a call stepped together (``mujoco_batch``) on
    ``env.sim_threads`` threads, in ``env.variant``'s definitions (gymnasium's or rllab's)."""

    def __init__(self, env: RLEnvConfig, oracle: bool = False):
        from .mujoco_batch import BatchedMujoco  # imports mujoco only for these families

        self.env, self.oracle, self.family = env, oracle, MUJOCO[env.name]
        self._make = lambda n: BatchedMujoco(
            env.name, n, env.frame_skip or None, env.sim_threads or None, variant=env.variant
        )
        self._sim = None
        probe = self._make(1)
        self.obs_dim = probe.obs_dim + (1 if oracle else 0)
        self.act_dim = probe.act_dim
        probe.close()

    def sample(self, n: int, g: torch.Generator) -> Tensor:
        u = torch.rand(n, 1, generator=g, device=g.device).cpu()
        high = self.family.high
        return u * high if high is not None else torch.where(u < 0.5, -1.0, 1.0)

    def rollout(
        self, fmodel: FunctionalModel, params: Params | list[Params], tasks: Tensor, trajectories: int, seeds: Tensor
    ) -> Episodes:
        from .mujoco_batch import batched_rollout

        n = tasks.shape[0] * trajectories
        if self._sim is None or self._sim.n < n:  # one simulator, grown to the largest call
            if self._sim is not None:
                self._sim.close()
            self._sim = self._make(n)
        return batched_rollout(
            self._sim, fmodel, params, tasks, trajectories, self.env.horizon, seeds, oracle=self.oracle
        )


def make_tasks(env: RLEnvConfig, oracle: bool = False) -> NavigationTasks | MujocoTasks:
    return NavigationTasks(env, oracle) if env.name == NAVIGATION else MujocoTasks(env, oracle)


def rollout_seeds(n: int, generator: torch.Generator) -> Tensor:
    """``n`` task seeds for one round of rollouts, drawn from the run's generator (CPU int64);
    room is left below 2**31 for one seed per trajectory above each."""
    return torch.randint(2**31 - 2**20, (n,), generator=generator, device=generator.device).cpu()
