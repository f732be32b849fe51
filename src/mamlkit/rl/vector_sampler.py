"""Rollouts of gymnasium environments with the task API through gymnasium's vector API.

The episodes of a meta-batch (tasks × trajectories) run in chunks of ``num_envs`` parallel
environments, each set to its episode's task; the policy acts on the whole chunk at once with
each episode's own (adapted) parameters. ``processes > 1`` splits the copies over this
process and worker processes (``SplitVectorEnv``: one message per worker and step), which
spreads MuJoCo over the cores; ``asynchronous=True`` gives each copy a worker of its own
(``AsyncVectorEnv``: a message per copy and step, slower than one process on 2 cores).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from ..engine.functional import FunctionalModel, Params
from . import envs  # noqa: F401  (registers mamlkit's environments)
from .sampler import Episodes

# ``policy(task_index)`` binds a chunk's rows to their tasks once and returns ``obs -> (mean, log_std)``.
IndexedPolicy = Callable[[Tensor], Callable[[Tensor], tuple[Tensor, Tensor]]]


def make_vector_env(
    env_id: str, num_envs: int, asynchronous: bool = False, processes: int = 1, **kwargs
) -> gym.vector.VectorEnv | SplitVectorEnv:
    """``num_envs`` copies of ``env_id``; the time limit is left to the sampler (``horizon``).

    ``processes > 1`` splits the copies over this process and ``processes - 1`` workers
    (``SplitVectorEnv``); ``asynchronous`` gives each copy its own worker (``AsyncVectorEnv``).
    """
    if processes > 1:
        return SplitVectorEnv(env_id, num_envs, processes, **kwargs)
    fns = [lambda: gym.make(env_id, **kwargs)] * num_envs
    if asynchronous:
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def _step_copies(copies: list, actions: np.ndarray, alive: np.ndarray, obs_shape: tuple):
    """Step each copy whose episode goes on -> ``(obs, rewards, terminated)``; ended ones are left
    alone (their rows are masked out; the next ``reset`` restarts them) and report zeros."""
    obs = np.zeros((len(copies), *obs_shape))
    reward = np.zeros(len(copies))
    terminated = np.zeros(len(copies), dtype=bool)
    for i, env in enumerate(copies):
        if alive[i]:
            obs[i], reward[i], terminated[i], _, _ = env.step(actions[i])
    return obs, reward, terminated


def _worker(conn, env_id: str, n: int, kwargs: dict) -> None:
    """A ``SplitVectorEnv`` worker: ``n`` copies, driven by ``(command, argument)`` messages."""
    copies = [gym.make(env_id, **kwargs) for _ in range(n)]
    shape = copies[0].observation_space.shape
    try:
        while True:
            cmd, arg = conn.recv()
            if cmd == "step":
                conn.send(_step_copies(copies, *arg, shape))
            elif cmd == "reset":
                conn.send(np.stack([env.reset(seed=seed)[0] for env, seed in zip(copies, arg)]))
            elif cmd == "set_attr":
                name, values = arg
                for env, value in zip(copies, values):
                    env.set_wrapper_attr(name, value)
                conn.send(None)
            elif cmd == "close":
                break
    finally:
        for env in copies:
            env.close()
        conn.close()


class SplitVectorEnv:
    """``num_envs`` copies split into ``processes`` contiguous groups: the first group is stepped
    in this process, each other one in a worker process, all at the same time.

    Unlike ``AsyncVectorEnv`` (one worker per copy, a message per copy and step, slower than
    stepping in one process on two cores: BENCHMARKS.md), this sends one message per worker and
    step, so the simulation spreads over the cores without drowning in messages. It has the
    parts of the vector API ``vector_rollout`` uses; ``reset(seed=s)`` seeds copy ``i`` with
    ``s + i`` like gymnasium's vector envs.
    """

    def __init__(self, env_id: str, num_envs: int, processes: int, **kwargs):
        import multiprocessing as mp

        processes = max(1, min(processes, num_envs))
        bounds = np.linspace(0, num_envs, processes + 1).round().astype(int)
        self.groups = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        self.num_envs = num_envs
        self.local = [gym.make(env_id, **kwargs) for _ in range(self.groups[0][1])]
        self.single_observation_space = self.local[0].observation_space
        self.single_action_space = self.local[0].action_space
        self.conns, self.procs = [], []
        ctx = mp.get_context()
        for a, b in self.groups[1:]:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, env_id, b - a, kwargs), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        # Workers stop with the env even without ``close`` (the task families never call it).
        self._finalizer = weakref.finalize(self, _shutdown, self.conns, self.procs)

    def _broadcast(self, cmd: str, per_group: list) -> list:
        """Send each worker its group's argument; return the workers' replies."""
        for conn, arg in zip(self.conns, per_group[1:]):
            conn.send((cmd, arg))
        return [conn.recv() for conn in self.conns]

    def set_attr(self, name: str, values: list) -> None:
        for env, value in zip(self.local, values):
            env.set_wrapper_attr(name, value)
        self._broadcast("set_attr", [(name, values[a:b]) for a, b in self.groups])

    def reset(self, seed: int):
        seeds = [seed + i for i in range(self.num_envs)]
        for conn, (a, b) in zip(self.conns, self.groups[1:]):
            conn.send(("reset", seeds[a:b]))
        local = [env.reset(seed=s)[0] for env, s in zip(self.local, seeds)]
        return np.concatenate([np.stack(local), *[conn.recv() for conn in self.conns]]), {}

    def step_alive(self, actions: np.ndarray, alive: np.ndarray):
        """One step of every copy still in its episode -> ``(obs, rewards, terminated)``."""
        for conn, (a, b) in zip(self.conns, self.groups[1:]):
            conn.send(("step", (actions[a:b], alive[a:b])))
        n = self.groups[0][1]
        parts = [_step_copies(self.local, actions[:n], alive[:n], self.single_observation_space.shape)]
        parts += [conn.recv() for conn in self.conns]
        return tuple(np.concatenate(x) for x in zip(*parts))

    def close(self) -> None:
        self._finalizer()
        for env in self.local:
            env.close()


def _shutdown(conns: list, procs: list) -> None:
    """Stop ``SplitVectorEnv`` workers (on ``close`` or when the env is garbage-collected)."""
    for conn in conns:
        try:
            conn.send(("close", None))
        except (BrokenPipeError, OSError):
            pass
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()


def indexed_policy(fmodel: FunctionalModel, params: Params | list[Params]) -> IndexedPolicy:
    """The policy on a chunk's ``obs [n, d]`` where row ``j`` belongs to task ``task_index[j]``.

    Episodes are numbered task by task, so a chunk's rows form a few runs of one task each
    (at most two when ``num_envs <= trajectories``). The policy is called once per run with
    that task's parameters: a plain call costs a fraction of a ``vmap`` over per-row
    parameters gathered at every step (BENCHMARKS.md, "Measurements behind design choices").
    """
    if isinstance(params, dict):
        return lambda task_index: lambda obs: fmodel(params, obs)

    def bind(task_index: Tensor):
        runs = _runs(task_index.tolist())
        if len(runs) == 1:
            only = params[runs[0][2]]
            return lambda obs: fmodel(only, obs)

        def act(obs: Tensor) -> tuple[Tensor, Tensor]:
            outs = [fmodel(params[task], obs[a:b]) for a, b, task in runs]
            return tuple(torch.cat(parts) for parts in zip(*outs))

        return act

    return bind


def _runs(index: list[int]) -> list[tuple[int, int, int]]:
    """``(start, end, value)`` of each run of equal consecutive values of ``index``."""
    runs = []
    for j, v in enumerate(index):
        if runs and runs[-1][2] == v:
            runs[-1] = (runs[-1][0], j + 1, v)
        else:
            runs.append((j, j + 1, v))
    return runs


def _step(vec: gym.vector.VectorEnv | SplitVectorEnv, actions: np.ndarray, alive: np.ndarray):
    """One step of every copy that is still in its episode -> ``(obs, rewards, terminated)``.

    A synchronous vector env's copies are stepped directly: ``SyncVectorEnv.step`` adds a
    third or more to each copy's step (info dicts, autoreset bookkeeping). Copies whose
    episode ended are not stepped (their rows are masked out; the next chunk's ``reset``
    restarts them), where the vector env would reset them; the kept data are the same.
    """
    if isinstance(vec, SplitVectorEnv):
        return vec.step_alive(actions, alive)
    if not isinstance(vec, gym.vector.SyncVectorEnv):
        obs, reward, terminated, _, _ = vec.step(actions)
        return obs, reward, terminated
    return _step_copies(vec.envs, actions, alive, vec.single_observation_space.shape)


@torch.no_grad()
def vector_rollout(
    vec: gym.vector.VectorEnv | SplitVectorEnv,
    policy: IndexedPolicy,
    tasks: list[dict],
    trajectories: int,
    horizon: int,
    generator: torch.Generator,
    seed: int,
) -> Episodes:
    """``trajectories`` episodes of ``horizon`` steps for each task -> padded ``Episodes``
    ``[tasks, trajectories, horizon, ...]``. Steps after an episode terminates are masked out.

    Each chunk of ``num_envs`` episodes is recorded into its own ``[num_envs, horizon, ...]``
    buffers and copied into the meta-batch's once, instead of scattering every step.
    """
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
        keep = np.arange(start, start + n_envs) < total
        task_index = torch.from_numpy(rows // trajectories)
        vec.set_attr("task", [tasks[i] for i in task_index.tolist()])
        obs, _ = vec.reset(seed=seed + start)
        act = policy(task_index)
        c_obs = torch.zeros(n_envs, horizon, obs_dim)
        c_act = torch.zeros(n_envs, horizon, act_dim)
        c_rew = torch.zeros(n_envs, horizon)
        c_mask = torch.zeros(n_envs, horizon)
        alive = np.ones(n_envs, dtype=bool)
        for t in range(horizon):
            o = torch.from_numpy(obs).float()
            mean, log_std = act(o)
            noise = torch.randn(mean.shape, generator=generator)
            action = mean + torch.exp(log_std) * noise
            obs, reward, terminated = _step(vec, action.numpy(), alive)
            alive_t = torch.from_numpy(alive).float()
            c_obs[:, t] = o
            c_act[:, t] = action
            c_rew[:, t] = torch.from_numpy(reward).float() * alive_t
            c_mask[:, t] = alive_t
            alive = alive & ~np.asarray(terminated, dtype=bool)
            if not alive.any():
                break
        sel = torch.from_numpy(rows[keep])
        keep_t = torch.from_numpy(keep)
        obs_buf[sel], act_buf[sel], rew_buf[sel], mask_buf[sel] = (
            c_obs[keep_t],
            c_act[keep_t],
            c_rew[keep_t],
            c_mask[keep_t],
        )
    shape = (len(tasks), trajectories, horizon)
    return Episodes(
        obs_buf.view(*shape, obs_dim), act_buf.view(*shape, act_dim), rew_buf.view(shape), mask_buf.view(shape)
    )
