"""2D navigation (paper Section 5.3): a point moves from the origin toward a goal it does not see.

``step`` is the one definition of the dynamics, written for torch tensors with any leading
batch shape; the gymnasium environment and the batched training sampler both call it.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor


def step(
    position: Tensor, goal: Tensor, action: Tensor, max_action: float = 0.1, tolerance: float = 0.01, scale: float = 1.0
):
    """One step: scale and clip the action, move, reward = -distance to the goal, done within ``tolerance``.

    ``scale = max_action`` is rllab's ``normalize`` wrapper (the policy acts in [-1, 1]), which the
    official point environment ran under. Returns ``(new_position, reward, done)``.
    """
    position = position + (scale * action).clamp(-max_action, max_action)
    distance = torch.linalg.vector_norm(position - goal, dim=-1)
    return position, -distance, distance < tolerance


def sample_goals(n: int, generator: torch.Generator, low: float = -0.5, high: float = 0.5) -> Tensor:
    """``n`` goals, uniform on ``[low, high]²``."""
    return low + (high - low) * torch.rand(n, 2, generator=generator, device=generator.device).cpu()


class Navigation2DEnv(gym.Env):
    """Gymnasium view of one navigation task (``set_task`` picks the goal).

    Registered as ``mamlkit/Navigation2D-v0`` with a 100-step time limit. With ``oracle=True``
    the observation also holds the goal.
    """

    metadata = {"render_modes": []}

    def __init__(
        self, goal_range=(-0.5, 0.5), max_action: float = 0.1, tolerance: float = 0.01, oracle=False, normalized=False
    ):
        self.goal_range = tuple(goal_range)
        self.max_action = max_action
        self.tolerance = tolerance
        self.oracle = oracle
        self.scale = max_action if normalized else 1.0
        dim = 4 if oracle else 2
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        bound = 1.0 if normalized else max_action
        self.action_space = gym.spaces.Box(-bound, bound, (2,), np.float32)
        self._goal = torch.zeros(2)
        self._position = torch.zeros(2)

    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[dict]:
        """``n`` tasks ``{"goal": array(2)}`` with goals uniform on ``goal_range²``."""
        rng = rng if rng is not None else self.np_random
        return [{"goal": g} for g in rng.uniform(*self.goal_range, size=(n, 2)).astype(np.float32)]

    def set_task(self, task: dict) -> None:
        self._goal = torch.as_tensor(np.asarray(task["goal"], np.float32))

    def get_task(self) -> dict:
        return {"goal": self._goal.numpy().copy()}

    def _obs(self) -> np.ndarray:
        obs = torch.cat([self._position, self._goal]) if self.oracle else self._position
        return obs.numpy().astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._position = torch.zeros(2)
        return self._obs(), {"goal": self._goal.numpy().copy()}

    def step(self, action):
        action = torch.as_tensor(np.asarray(action, np.float32))
        self._position, reward, done = step(
            self._position, self._goal, action, self.max_action, self.tolerance, self.scale
        )
        return self._obs(), float(reward), bool(done), False, {"goal": self._goal.numpy().copy()}


class NavigationBatch:
    """Tasks × trajectories of navigation stepped together in torch (what the sampler trains on)."""

    def __init__(
        self,
        goals: Tensor,
        trajectories: int,
        max_action: float = 0.1,
        tolerance: float = 0.01,
        oracle=False,
        action_scale: float = 1.0,
    ):
        self.goals = goals[:, None, :].expand(-1, trajectories, -1)
        self.max_action, self.tolerance, self.oracle, self.action_scale = max_action, tolerance, oracle, action_scale
        self.position = torch.zeros_like(self.goals)

    @property
    def obs_dim(self) -> int:
        return 4 if self.oracle else 2

    def reset(self) -> Tensor:
        self.position = torch.zeros_like(self.goals)
        return self.observe()

    def observe(self) -> Tensor:
        return torch.cat([self.position, self.goals], -1) if self.oracle else self.position

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``action [tasks, trajectories, 2]`` -> ``(obs, reward [tasks, trajectories], done)``."""
        self.position, reward, done = step(
            self.position, self.goals, action, self.max_action, self.tolerance, self.action_scale
        )
        return self.observe(), reward, done
