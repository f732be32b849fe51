"""MuJoCo task families of the paper (Section 5.3) on gymnasium's HalfCheetah-v5 and Ant-v5.

Each environment has the task API (``sample_tasks(n, rng)``, ``set_task``, ``get_task`` and a
``task`` attribute that vector environments can set per sub-environment with ``set_attr``).
Rewards replace gymnasium's forward reward and keep its other terms:

- HalfCheetahVel: ``-|v_x - goal| - 0.05 ||a||²``, goal ~ U[0, 2]
- HalfCheetahDir: ``d * v_x - 0.05 ||a||²``, d = ±1 with equal probability
- AntVel: ``-|v_x - goal| + 1 + 0.05 - 0.005 ||a||² - 0.0005 ||clip(cfrc_ext, -1, 1)||²``, goal ~ U[0, 3]
- AntDir: ``d * v_x`` plus the same survival bonus and costs (no +1)

Where gymnasium's defaults differ from the official code (cbfinn/maml_rl on rllab), these
environments follow the official code:

- The simulation step is rllab's: its model files have no frame skip, so one step is one
  MuJoCo step of 0.01 s (half-cheetah) or 0.02 s (ant), where gymnasium steps 0.05 s (5 × 0.01).
  On gymnasium's models that is ``frame_skip`` 1 and 2. With gymnasium's 5, a 200-step episode
  lasts 5× (2.5×) longer, and a random ant leaves the healthy height range in ~60 steps instead
  of running ~195 (measured; see RESULTS.md). ``frame_skip`` can still be passed.
- Actions are clipped to the action bounds before the step, costs included (rllab's
  ``normalize`` wrapper clips what the policy sends); the Gaussian policy's samples go past them.
- AntVel adds 1 per step to the velocity term ("make it happy, not suicidal" in the official
  code): without it every step costs, and ending the episode early pays.
- The ant's weights are rllab's: survival 0.05 and control 0.5 · 1e-2, not gymnasium's defaults
  (1.0 and 0.5); its contact weight (5e-4) is gymnasium's too.

The ant episode ends when the torso height leaves [0.2, 1.0] (Ant-v5's default healthy range).
Gymnasium's observations and contact model differ from rllab's (see docs/protocol.md#rl-mujoco):
returns are comparable with the paper in shape and ordering, not to the decimal.
"""

from __future__ import annotations

import mujoco
import numpy as np
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

from .families import ANT_CONTACT, ANT_CTRL, ANT_SURVIVE, CHEETAH_CTRL, FRAME_SKIP, MUJOCO, MujocoFamily
from .mujoco_sim import load_model


class _TaskMixin:
    """The task API over a single scalar task parameter stored in ``self._task``; the
    subclass's ``family`` (from the task table) names it and gives its range."""

    family: MujocoFamily

    @property
    def key(self) -> str:
        return self.family.key

    def _sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[dict]:
        rng = rng if rng is not None else self.np_random
        return [{self.key: float(v)} for v in self._sample(n, rng)]

    def _start_with(self, task: dict | None) -> None:
        """Task parameter 0 until a task is set; ``task`` set now if given."""
        self._task = 0.0
        if task is not None:
            self.set_task(task)

    def set_task(self, task: dict) -> None:
        self._task = float(task[self.key])

    def get_task(self) -> dict:
        return {self.key: self._task}

    @property
    def task(self) -> dict:
        return self.get_task()

    @task.setter
    def task(self, task: dict) -> None:
        self.set_task(task)


class _Velocity(_TaskMixin):
    def _sample(self, n, rng):
        return rng.uniform(0.0, self.family.high, size=n)

    def forward_reward(self, v: float) -> float:
        return -abs(v - self._task) + self.family.offset


class _Direction(_TaskMixin):
    def _sample(self, n, rng):
        return rng.choice([-1.0, 1.0], size=n)

    def forward_reward(self, v: float) -> float:
        return self._task * v


def _clip(env, action) -> np.ndarray:
    return np.clip(action, env.action_space.low, env.action_space.high)


class _Model:
    """Gymnasium's model loading, through ``load_model``: the half-cheetah file's ``settotalmass``
    would otherwise print MuJoCo's deprecation warning on every environment made."""

    def _initialize_simulation(self):
        model = load_model(self.fullpath)
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)  # as gymnasium does
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
        return model, mujoco.MjData(model)


class _Cheetah(_Model, HalfCheetahEnv):
    def __init__(self, task: dict | None = None, **kwargs):
        super().__init__(**{"frame_skip": FRAME_SKIP["halfcheetah"], **kwargs})
        self._start_with(task)

    def step(self, action):
        action = _clip(self, action)
        obs, _, terminated, truncated, info = super().step(action)
        ctrl = CHEETAH_CTRL * float(np.square(action).sum())
        reward = self.forward_reward(info["x_velocity"]) - ctrl
        info.update(reward_forward=reward + ctrl, reward_ctrl=-ctrl, task=self.get_task())
        return obs, reward, terminated, truncated, info


class _Ant(_Model, AntEnv):
    def __init__(self, task: dict | None = None, **kwargs):
        rllab = {
            "frame_skip": FRAME_SKIP["ant"],
            "ctrl_cost_weight": ANT_CTRL,
            "healthy_reward": ANT_SURVIVE,
            "contact_cost_weight": ANT_CONTACT,
        }
        super().__init__(**{**rllab, **kwargs})
        self._start_with(task)

    def step(self, action):
        action = _clip(self, action)
        obs, _, terminated, truncated, info = super().step(action)
        forward = self.forward_reward(info["x_velocity"])
        reward = forward + info["reward_survive"] + info["reward_ctrl"] + info["reward_contact"]
        info.update(reward_forward=forward, task=self.get_task())
        return obs, reward, terminated, truncated, info


class HalfCheetahVelEnv(_Velocity, _Cheetah):
    """Half-cheetah running at a goal velocity ~ U[0, 2]."""

    family = MUJOCO["halfcheetah_vel"]


class HalfCheetahDirEnv(_Direction, _Cheetah):
    """Half-cheetah running forward (+1) or backward (-1)."""

    family = MUJOCO["halfcheetah_dir"]


class AntVelEnv(_Velocity, _Ant):
    """Ant running at a goal velocity ~ U[0, 3]."""

    family = MUJOCO["ant_vel"]


class AntDirEnv(_Direction, _Ant):
    """Ant running forward (+1) or backward (-1)."""

    family = MUJOCO["ant_dir"]
