"""Batched MuJoCo sampling: every episode of a meta-batch stepped together, with no Python per copy.

``BatchedMujoco`` holds ``n`` copies of one of the four task families (``halfcheetah_vel``,
``halfcheetah_dir``, ``ant_vel``, ``ant_dir``) and reproduces the gymnasium environments of
``mujoco_tasks.py`` exactly (same model file, frame skip, reset noise, action clipping, rewards,
terminations and observations; the tests compare whole episodes to 1e-9): the simulator
steps all copies at once and everything else is computed from the state of all copies
together in numpy. ``batched_rollout`` runs tasks × trajectories episodes with the policy
called once per time step for all of them, each task with its own (adapted) parameters.
``BatchedMujocoTasks`` is a drop-in for ``tasks.MujocoTasks`` built on them.

``variant="paper"`` (``env.variant: paper``) holds the paper variant of the family instead:
rllab's models, observations, centre-of-mass velocity and reset noise, reproducing the
``*PaperEnv`` classes of ``mujoco_tasks.py`` in the same way (``tests/test_mujoco_paper.py``);
its back ends are ``"capi"`` (the default) and ``"threads"``.

Simulator back ends (``mujoco_sim``), all bit-identical to gymnasium's environments:
``"batch"`` (MuJoCo >= 4's ``mujoco.batch``; the half-cheetah's default), ``"capi"`` (the same
batch through MuJoCo's C API, which can compute the ant's contact forces; the ant's default) and
``"threads"`` (one ``MjData`` per copy; any family, the only one with MuJoCo 3). Measurements:
BENCHMARKS.md, "Batched MuJoCo sampler".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..engine.functional import FunctionalModel, Params
from .families import (
    ANT_CONTACT,
    ANT_CONTACT_RANGE,
    ANT_CTRL,
    ANT_HEALTHY_Z,
    ANT_MAIN_BODY,
    ANT_SURVIVE,
    CHEETAH_CTRL,
    FRAME_SKIP,
    MUJOCO,
    PAPER_BODY,
    PAPER_FRAME_SKIP,
    PAPER_QPOS_NOISE,
    PAPER_QVEL_NOISE,
    RESET_NOISE,
    VARIANTS,
    XML,
    paper_model_path,
)
from .mujoco_sim import (
    _BatchSim,
    _CapiSim,
    _ThreadSim,
    default_threads,
    has_batch,
    has_capi,
    initial_qpos,
    load_model,
)
from .policy import TaskPolicy
from .sampler import Episodes, task_noise


class BatchedMujoco:
    """``n_copies`` copies of a task family, stepped together.

    ``reset(seeds=...)`` draws each copy's initial state exactly as gymnasium's
    ``env.reset(seed=s)`` does (one ``np.random.default_rng(s)`` per copy); ``reset(rng=...)``
    draws all copies' noise from one generator at once. ``set_tasks`` sets each copy's goal
    velocity or direction; ``step(actions)`` clips them to the action bounds and returns
    ``(obs [n, d], reward [n], terminated [n])`` as float64/bool numpy arrays. ``active``
    (a boolean mask, or indices) restricts reset and step to some copies; the others are not
    stepped and their rows of the returned arrays are meaningless.

    ``backend`` (see the module's docstring): ``"batch"`` (the half-cheetah's default with
    MuJoCo >= 4), ``"capi"`` (the ant's), ``"threads"`` (any family; the only one with MuJoCo 3).
    ``threads``: simulation threads, the caller's included (default: the CPUs this process may use).
    ``variant``: ``"gym"`` (gymnasium's models and definitions) or ``"paper"`` (rllab's; the
    module's docstring).
    """

    def __init__(
        self,
        task_name: str,
        n_copies: int,
        frame_skip: int | None = None,
        threads: int | None = None,
        backend: str | None = None,
        variant: str = "gym",
    ):
        if variant not in VARIANTS:
            raise ValueError(f"variant: one of {', '.join(map(repr, VARIANTS))}, got {variant!r}")
        self.name, self.family, self.n = task_name, MUJOCO[task_name], n_copies
        self.variant = variant
        if variant == "paper":
            self._init_paper(n_copies, frame_skip, threads, backend)
            return
        from gymnasium.envs.mujoco.mujoco_env import expand_model_path

        fam = self.family
        self.frame_skip = int(frame_skip or FRAME_SKIP[fam.robot])
        self.model = load_model(expand_model_path(XML[fam.robot]))
        m = self.model
        self.dt = m.opt.timestep * self.frame_skip
        self.init_qpos, self.init_qvel = m.qpos0.copy(), np.zeros(m.nv)
        bounds = m.actuator_ctrlrange.copy().astype(np.float32)  # gymnasium's action space (float32)
        self.low, self.high = bounds.T
        self.act_dim = m.nu
        self.obs_dim = (m.nq - 2 + m.nv + 6 * (m.nbody - 1)) if fam.ant else (m.nq - 1 + m.nv)
        self.threads = threads or default_threads()
        if backend is None:
            backend = "threads" if not has_batch() else "capi" if fam.ant and has_capi() else "batch"
        if backend == "batch":
            if fam.ant:
                raise ValueError("the ant needs cfrc_ext after every step: use backend='capi' or 'threads'")
            self.sim = _BatchSim(m, n_copies, self.threads, self.frame_skip, need_xpos=False)
        elif backend == "capi":
            self.sim = _CapiSim(m, n_copies, self.threads, self.frame_skip)
        elif backend == "threads":
            self.sim = _ThreadSim(m, n_copies, self.threads, self.frame_skip, need_cfrc=fam.ant)
        else:
            raise ValueError(f"backend: 'batch', 'capi' or 'threads', got {backend!r}")
        self.backend = backend
        self.tasks = np.zeros(n_copies)
        self._x = np.zeros(n_copies)  # x of the velocity body before the step

    def _init_paper(self, n_copies: int, frame_skip: int | None, threads: int | None, backend: str | None) -> None:
        """The paper variant: rllab's model file, its init_qpos, the torso's subtree quantities."""
        import mujoco

        fam = self.family
        self.frame_skip = int(frame_skip or PAPER_FRAME_SKIP[fam.robot])
        self.model = m = load_model(paper_model_path(fam.robot))
        self.dt = m.opt.timestep * self.frame_skip
        self.init_qpos, self.init_qvel = initial_qpos(m), np.zeros(m.nv)
        bounds = m.actuator_ctrlrange.copy().astype(np.float32)
        self.low, self.high = bounds.T
        self.act_dim = m.nu
        self.torso = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, PAPER_BODY)
        # rllab's get_current_obs: the ant's qpos, qvel, clipped cfrc_ext of every body, the torso's
        # rotation matrix and centre of mass; the half-cheetah's qpos[1:], qvel, centre of mass
        self.obs_dim = (m.nq + m.nv + 6 * m.nbody + 9 + 3) if fam.ant else (m.nq - 1 + m.nv + 3)
        self.threads = threads or default_threads()
        if backend is None:
            backend = "capi" if has_capi() else "threads"
        if backend == "capi":
            self.sim = _CapiSim(m, n_copies, self.threads, self.frame_skip, paper=True, need_cfrc=fam.ant)
        elif backend == "threads":
            self.sim = _ThreadSim(m, n_copies, self.threads, self.frame_skip, need_cfrc=fam.ant, paper=True)
        elif backend == "batch":
            raise ValueError(
                "the paper variant needs mj_forward, the subtree velocities (and the ant's cfrc_ext) after "
                "every step: use backend='capi' or 'threads'"
            )
        else:
            raise ValueError(f"backend: 'capi' or 'threads', got {backend!r}")
        self.backend = backend
        self.tasks = np.zeros(n_copies)

    def _index(self, active) -> np.ndarray:
        if active is None:
            return np.arange(self.n)
        active = np.asarray(active)
        return np.flatnonzero(active) if active.dtype == bool else active.astype(np.int64)

    def set_tasks(self, values, active=None) -> None:
        """Each (active) copy's goal velocity or direction."""
        self.tasks[self._index(active)] = np.asarray(values, dtype=np.float64).reshape(-1)

    def reset(self, seeds: Sequence[int] | None = None, rng: np.random.Generator | None = None, active=None):
        """New episodes -> ``obs [n, d]``: gymnasium's ``reset_model`` (qpos + U(-0.1, 0.1),
        qvel + 0.1 N(0, 1)) with one generator per copy seeded ``seeds[i]``, or all from ``rng``."""
        ids = self._index(active)
        if self.variant == "paper":
            return self._reset_paper(ids, seeds, rng)
        m, k = self.model, len(ids)
        lo, hi = -RESET_NOISE, RESET_NOISE
        if seeds is not None:
            if len(seeds) != k:
                raise ValueError(f"{k} copies to reset, {len(seeds)} seeds")
            uq, nv = np.empty((k, m.nq)), np.empty((k, m.nv))
            for j, s in enumerate(seeds):  # gymnasium's reset(seed=s): seeding.np_random(s)
                g = np.random.default_rng(int(s))
                uq[j] = g.uniform(low=lo, high=hi, size=m.nq)
                nv[j] = g.standard_normal(m.nv)
        else:
            rng = rng if rng is not None else np.random.default_rng()
            uq, nv = rng.uniform(low=lo, high=hi, size=(k, m.nq)), rng.standard_normal((k, m.nv))
        qpos = self.init_qpos + uq
        qvel = self.init_qvel + RESET_NOISE * nv
        self.sim.reset(ids, qpos, qvel)
        # x before the first step: the cheetah's qpos[0]; the ant's torso xpos after mj_forward
        self._x[ids] = self.sim.xpos[ids, ANT_MAIN_BODY, 0] if self.family.ant else qpos[:, 0]
        obs = np.zeros((self.n, self.obs_dim))
        obs[ids] = self._obs(ids)
        return obs

    def _reset_paper(self, ids: np.ndarray, seeds, rng) -> np.ndarray:
        """rllab's ``reset_mujoco``: ``init_qpos + 0.01 N(0, 1)`` and ``0.1 N(0, 1)`` velocities
        (qpos's normals drawn first), then ``mj_forward``; one generator per copy as gymnasium's
        ``reset(seed=s)``, or all from ``rng``."""
        m, k = self.model, len(ids)
        if seeds is not None:
            if len(seeds) != k:
                raise ValueError(f"{k} copies to reset, {len(seeds)} seeds")
            zq, zv = np.empty((k, m.nq)), np.empty((k, m.nv))
            for j, s in enumerate(seeds):
                g = np.random.default_rng(int(s))
                zq[j] = g.standard_normal(m.nq)
                zv[j] = g.standard_normal(m.nv)
        else:
            rng = rng if rng is not None else np.random.default_rng()
            zq, zv = rng.standard_normal((k, m.nq)), rng.standard_normal((k, m.nv))
        qpos = self.init_qpos + zq * PAPER_QPOS_NOISE
        qvel = self.init_qvel + zv * PAPER_QVEL_NOISE
        self.sim.reset(ids, qpos, qvel)
        obs = np.zeros((self.n, self.obs_dim))
        obs[ids] = self._obs_paper(ids)
        return obs

    def _obs_paper(self, ids: np.ndarray, contact: np.ndarray | None = None) -> np.ndarray:
        """rllab's ``get_current_obs`` (see ``_init_paper``), from the state after ``mj_forward``."""
        sim, k, b = self.sim, len(ids), self.torso
        if not k:
            return np.zeros((0, self.obs_dim))
        qpos, qvel, com = sim.qpos[ids], sim.qvel[ids], sim.subtree_com[ids, b]
        if not self.family.ant:
            return np.concatenate([qpos[:, 1:], qvel, com], 1)
        if contact is None:
            contact = np.clip(sim.cfrc_ext[ids], *ANT_CONTACT_RANGE)
        return np.concatenate([qpos, qvel, contact.reshape(k, -1), sim.xmat[ids, b], com], 1)

    def _step_paper(self, ids: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The official code's rewards with the torso's centre-of-mass velocity (rllab's
        ``get_body_comvel``): velocity ``-|v - goal|`` (+1 for the ant), direction ``d v``; the
        half-cheetah's ``0.05 ||a||²``; the ant's ``0.005 ||a||²``, ``5e-4 ||clip(cfrc_ext)||²`` and a
        survival bonus of 0.05 on every step, the terminal one included; the ant's episode ends when
        its state is not finite or the torso's height leaves [0.2, 1.0]."""
        fam, sim, n, k = self.family, self.sim, self.n, len(ids)
        sim.step(ids, a)
        v = sim.subtree_linvel[ids, self.torso, 0]
        task = self.tasks[ids]
        forward = (-np.abs(v - task) + fam.offset) if fam.velocity else task * v
        obs, reward, terminated = np.zeros((n, self.obs_dim)), np.zeros(n), np.zeros(n, dtype=bool)
        if not fam.ant:
            ctrl = CHEETAH_CTRL * np.square(a).sum(-1).astype(np.float64)
            reward[ids] = forward - ctrl
            obs[ids] = self._obs_paper(ids)
            return obs, reward, terminated
        qpos, qvel = sim.qpos[ids], sim.qvel[ids]
        contact_forces = np.clip(sim.cfrc_ext[ids], *ANT_CONTACT_RANGE)
        ctrl = ANT_CTRL * np.square(a).sum(-1).astype(np.float64)  # as the env class's: float(sum)
        contact = ANT_CONTACT * np.square(contact_forces).reshape(k, -1).sum(-1)
        reward[ids] = forward - ctrl - contact + ANT_SURVIVE
        finite = np.isfinite(qpos).all(1) & np.isfinite(qvel).all(1)
        healthy = finite & (ANT_HEALTHY_Z[0] <= qpos[:, 2]) & (qpos[:, 2] <= ANT_HEALTHY_Z[1])
        terminated[ids] = ~healthy
        obs[ids] = self._obs_paper(ids, contact_forces)
        return obs, reward, terminated

    def _obs(self, ids: np.ndarray, contact: np.ndarray | None = None) -> np.ndarray:
        """gymnasium's ``_get_obs``: cheetah ``qpos[1:], qvel``; ant ``qpos[2:], qvel`` and the
        clipped ``cfrc_ext`` of bodies 1: (``include_cfrc_ext_in_observation=True``)."""
        sim = self.sim
        qpos, qvel = sim.qpos[ids], sim.qvel[ids]
        if not self.family.ant:
            return np.concatenate([qpos[:, 1:], qvel], 1)
        if contact is None:
            contact = np.clip(sim.cfrc_ext[ids], *ANT_CONTACT_RANGE)
        if not len(ids):
            return np.zeros((0, self.obs_dim))
        return np.concatenate([qpos[:, 2:], qvel, contact[:, 1:].reshape(len(ids), -1)], 1)

    def step(self, actions, active=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Step the (active) copies -> ``(obs [n, d], reward [n], terminated [n])``.

        ``actions [n, a]`` (or one row per active copy) are clipped to the bounds first, in
        their own dtype as ``np.clip`` with gymnasium's float32 bounds does; the costs are
        computed from the clipped actions in the same dtypes as the gymnasium environments.
        """
        ids = self._index(active)
        actions = np.asarray(actions)
        if len(actions) != len(ids):
            actions = actions[ids]
        a = np.clip(actions, self.low, self.high)
        if self.variant == "paper":
            return self._step_paper(ids, a)
        fam, sim = self.family, self.sim
        sim.step(ids, a)
        if fam.ant:
            x_after = sim.xpos[ids, ANT_MAIN_BODY, 0]
        else:
            x_after = sim.qpos[ids, 0]
        v = (x_after - self._x[ids]) / self.dt
        self._x[ids] = x_after
        task = self.tasks[ids]
        forward = (-np.abs(v - task) + fam.offset) if fam.velocity else task * v
        n = self.n
        obs, reward, terminated = np.zeros((n, self.obs_dim)), np.zeros(n), np.zeros(n, dtype=bool)
        if not fam.ant:
            ctrl = CHEETAH_CTRL * np.square(a).sum(-1).astype(np.float64)  # float(sum) in mujoco_tasks
            reward[ids] = forward - ctrl
        else:
            qpos, qvel = sim.qpos[ids], sim.qvel[ids]
            contact_forces = np.clip(sim.cfrc_ext[ids], *ANT_CONTACT_RANGE)
            finite = np.isfinite(qpos).all(1) & np.isfinite(qvel).all(1)
            healthy = finite & (ANT_HEALTHY_Z[0] <= qpos[:, 2]) & (qpos[:, 2] <= ANT_HEALTHY_Z[1])
            survive = healthy * ANT_SURVIVE
            ctrl = ANT_CTRL * np.square(a).sum(-1)  # in the action's dtype, as gymnasium's
            contact = ANT_CONTACT * np.square(contact_forces).reshape(len(ids), 6 * self.model.nbody).sum(-1)
            reward[ids] = forward + survive + -ctrl + -contact
            terminated[ids] = ~healthy
        obs[ids] = self._obs(ids, contact_forces if fam.ant else None)
        return obs, reward, terminated

    def close(self) -> None:
        if hasattr(self.sim, "close"):
            self.sim.close()


@torch.no_grad()
def batched_rollout(
    env: BatchedMujoco,
    fmodel: FunctionalModel,
    params: Params | list[Params],
    tasks: Tensor,
    trajectories: int,
    horizon: int,
    seeds: Tensor,
    oracle: bool = False,
) -> Episodes:
    """``trajectories`` episodes of ``horizon`` steps for each task ``tasks [T, 1]`` -> padded
    ``Episodes [T, trajectories, horizon, ...]`` (mask 1 up to and including the terminal step).

    Task ``i``'s episode ``j`` starts from gymnasium's ``reset(seed=seeds[i] + j)``, and its action
    noise is drawn from ``seeds[i]`` (``sampler.task_noise``), so a task's episodes do not depend
    on the other tasks of the call. The policy is called once per time step for all the
    episodes in the env (``env.n // trajectories`` tasks at a time); actions are
    ``mean + exp(log_std) * noise``, and the episode keeps them unclipped (the environment
    clips). ``oracle``: the task value is appended to the observation, for the policy and in
    the episodes.
    """
    n_tasks = tasks.shape[0]
    per_chunk = env.n // trajectories
    if per_chunk < 1:
        raise ValueError(f"the env has {env.n} copies, fewer than the {trajectories} trajectories of a task")
    policy = TaskPolicy(fmodel, params)
    values = tasks[:, 0].double().numpy()
    d = env.obs_dim + (tasks.shape[1] if oracle else 0)
    a = env.act_dim
    total = n_tasks * trajectories
    noise = task_noise(seeds, (trajectories, horizon, a))
    obs_buf = torch.zeros(horizon, total, d)
    act_buf = torch.zeros(horizon, total, a)
    rew_buf = torch.zeros(horizon, total)
    mask_buf = torch.zeros(horizon, total)
    for t0 in range(0, n_tasks, per_chunk):
        t1 = min(n_tasks, t0 + per_chunk)
        k, n = t1 - t0, (t1 - t0) * trajectories
        rows = slice(t0 * trajectories, t1 * trajectories)
        active = np.arange(n)
        env.set_tasks(np.repeat(values[t0:t1], trajectories), active)
        obs = env.reset(seeds=[int(s) + j for s in seeds[t0:t1] for j in range(trajectories)], active=active)[:n]
        extra = tasks[t0:t1, None, :].float().expand(k, trajectories, tasks.shape[1]) if oracle else None
        alive = np.ones(n, dtype=bool)
        alive_t = torch.ones(n)
        for t in range(horizon):
            o = torch.from_numpy(obs).float().view(k, trajectories, -1)
            if oracle:
                o = torch.cat([o, extra], -1)
            mean, log_std = policy(o, slice(t0, t1))
            action = (mean + torch.exp(log_std) * noise[t0:t1, :, t]).view(n, a)
            step_ids = active if alive.all() else np.flatnonzero(alive)
            obs_all, reward, terminated = env.step(action.numpy()[step_ids], step_ids)
            obs = obs_all[:n]
            obs_buf[t, rows] = o.view(n, d)
            act_buf[t, rows] = action
            rew_buf[t, rows] = torch.from_numpy(reward[:n]).float() * alive_t
            mask_buf[t, rows] = alive_t
            if terminated[:n].any():
                alive &= ~terminated[:n]
                alive_t = torch.from_numpy(alive).float()
                if not alive.any():
                    break
    shape = (n_tasks, trajectories, horizon)
    perm = lambda x: x.transpose(0, 1).reshape(*shape, *x.shape[2:])  # noqa: E731
    return Episodes(perm(obs_buf), perm(act_buf), perm(rew_buf), perm(mask_buf))
