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

The ``*PaperEnv`` classes (``mamlkit/HalfCheetahVelPaper-v0`` ..., ``env.variant: paper``) are
the paper variant: rllab's own environments as the official code defined them, on mamlkit's
redrawing of rllab's model files (``rl/models/``):

- each step is rllab's ``forward_dynamics``: ``mj_step`` then ``mj_forward`` at the new state
  (the ant's contact forces with it, as MuJoCo 1.31's forward computed them);
- the forward velocity ``v`` is the x velocity of the torso's subtree centre of mass (rllab's
  ``get_body_comvel("torso")``: MuJoCo's ``subtree_linvel``), not a difference of positions;
- observations are rllab's: half-cheetah ``qpos[1:], qvel`` and the torso's subtree centre of
  mass (20 numbers); ant ``qpos`` (root x, y included), ``qvel``, ``clip(cfrc_ext, -1, 1)`` of every
  body, the torso's rotation matrix and subtree centre of mass (125 numbers);
- resets are rllab's: ``init_qpos + 0.01 N(0, 1)``, ``0.1 N(0, 1)`` velocities (the ant starts
  from its file's ``init_qpos``: 0.55 high, legs bent);
- the ant's survival bonus 0.05 is paid on every step, the terminal one included (rllab's; Ant-v5
  pays it only while healthy); its episode ends when its state is not finite or the torso's
  height leaves [0.2, 1.0]. Rewards and costs are otherwise those above.
"""

from __future__ import annotations

import mujoco
import numpy as np
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.envs.mujoco.mujoco_env import MujocoEnv
from gymnasium.spaces import Box

from .families import (
    ANT_CONTACT,
    ANT_CONTACT_RANGE,
    ANT_CTRL,
    ANT_HEALTHY_Z,
    ANT_SURVIVE,
    CHEETAH_CTRL,
    FRAME_SKIP,
    MUJOCO,
    PAPER_BODY,
    PAPER_FRAME_SKIP,
    PAPER_QPOS_NOISE,
    PAPER_QVEL_NOISE,
    MujocoFamily,
    paper_model_path,
)
from .mujoco_sim import initial_qpos, load_model


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


class _Paper(_Model, MujocoEnv):
    """The paper variant's robot (see the module's docstring) on rllab's model file."""

    metadata = {"render_modes": ["human", "rgb_array", "depth_array", "rgbd_tuple"]}

    def __init__(self, task: dict | None = None, frame_skip: int | None = None, **kwargs):
        robot = self.family.robot
        MujocoEnv.__init__(
            self, paper_model_path(robot), frame_skip or PAPER_FRAME_SKIP[robot], observation_space=None, **kwargs
        )
        self.metadata = {**type(self).metadata, "render_fps": int(np.round(1.0 / self.dt))}
        self.init_qpos = initial_qpos(self.model)  # the file's init_qpos, as rllab's MujocoEnv
        self.torso = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, PAPER_BODY)
        size = self._get_obs().size
        self.observation_space = Box(low=-np.inf, high=np.inf, shape=(size,), dtype=np.float64)
        self._start_with(task)

    def _step_mujoco_simulation(self, ctrl, n_frames) -> None:
        """rllab's forward_dynamics: the steps, then mj_forward at the new state; the contact forces
        (the ant's) and the subtree velocities of that state."""
        self.data.ctrl[:] = ctrl
        mujoco.mj_step(self.model, self.data, nstep=n_frames)
        mujoco.mj_forward(self.model, self.data)
        if self.family.ant:
            mujoco.mj_rnePostConstraint(self.model, self.data)
        mujoco.mj_subtreeVel(self.model, self.data)

    def reset_model(self):
        """rllab's reset_mujoco: ``init_qpos + 0.01 N(0, 1)``, ``init_qvel + 0.1 N(0, 1)``."""
        nq, nv = self.model.nq, self.model.nv
        qpos = self.init_qpos + self.np_random.standard_normal(nq) * PAPER_QPOS_NOISE
        qvel = self.init_qvel + self.np_random.standard_normal(nv) * PAPER_QVEL_NOISE
        self.set_state(qpos, qvel)  # then mj_forward
        if self.family.ant:
            mujoco.mj_rnePostConstraint(self.model, self.data)
        return self._get_obs()

    def com_velocity(self) -> float:
        """x velocity of the torso's subtree centre of mass (rllab's ``get_body_comvel("torso")[0]``)."""
        return float(self.data.subtree_linvel[self.torso, 0])


class _PaperCheetah(_Paper):
    def _get_obs(self) -> np.ndarray:
        d = self.data
        return np.concatenate([d.qpos[1:], d.qvel, d.subtree_com[self.torso]])

    def step(self, action):
        action = _clip(self, action)
        self.do_simulation(action, self.frame_skip)
        v = self.com_velocity()
        ctrl = CHEETAH_CTRL * float(np.square(action).sum())
        forward = self.forward_reward(v)
        reward = forward - ctrl
        info = {"x_velocity": v, "reward_forward": forward, "reward_ctrl": -ctrl, "task": self.get_task()}
        return self._get_obs(), reward, False, False, info


class _PaperAnt(_Paper):
    def _contact_forces(self) -> np.ndarray:
        return np.clip(self.data.cfrc_ext, *ANT_CONTACT_RANGE)

    def _get_obs(self) -> np.ndarray:
        d, b = self.data, self.torso
        return np.concatenate([d.qpos, d.qvel, self._contact_forces().ravel(), d.xmat[b], d.subtree_com[b]])

    def step(self, action):
        action = _clip(self, action)
        self.do_simulation(action, self.frame_skip)
        v = self.com_velocity()
        forward = self.forward_reward(v)
        ctrl = ANT_CTRL * float(np.square(action).sum())  # the sum in the action's dtype, the rest in float64
        contact = ANT_CONTACT * float(np.square(self._contact_forces()).sum())
        reward = forward - ctrl - contact + ANT_SURVIVE  # rllab: the bonus on every step
        qpos, qvel = self.data.qpos, self.data.qvel
        finite = bool(np.isfinite(qpos).all() and np.isfinite(qvel).all())
        healthy = finite and ANT_HEALTHY_Z[0] <= qpos[2] <= ANT_HEALTHY_Z[1]
        info = {
            "x_velocity": v,
            "reward_forward": forward,
            "reward_ctrl": -ctrl,
            "reward_contact": -contact,
            "reward_survive": ANT_SURVIVE,
            "task": self.get_task(),
        }
        return self._get_obs(), float(reward), not healthy, False, info


class HalfCheetahVelPaperEnv(_Velocity, _PaperCheetah):
    """Half-cheetah at a goal velocity ~ U[0, 2], rllab's environment (the paper variant)."""

    family = MUJOCO["halfcheetah_vel"]


class HalfCheetahDirPaperEnv(_Direction, _PaperCheetah):
    """Half-cheetah forward (+1) or backward (-1), rllab's environment (the paper variant)."""

    family = MUJOCO["halfcheetah_dir"]


class AntVelPaperEnv(_Velocity, _PaperAnt):
    """Ant at a goal velocity ~ U[0, 3], rllab's environment (the paper variant)."""

    family = MUJOCO["ant_vel"]


class AntDirPaperEnv(_Direction, _PaperAnt):
    """Ant forward (+1) or backward (-1), rllab's environment (the paper variant)."""

    family = MUJOCO["ant_dir"]
