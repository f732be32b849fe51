"""Env steps per second of the batched MuJoCo sampler, policy in the loop, beside gymnasium stepping one env.

Samples a meta-batch (``--tasks`` × ``--trajectories`` × ``--horizon``) of each family with the
2×100 Gaussian MLP, every task with its own parameters (as after the inner update; ``--shared``
adds rows with one parameter set for all tasks, as before it):

- the sampler: ``tasks.make_tasks(cfg.env).rollout`` (all episodes stepped together) from the
  family's preset, for each ``--sim-threads`` count;
- the reference: the family's gymnasium environment (``gym.make``, as registered by mamlkit)
  stepped one step at a time in this process with random actions and no policy, ``--gym-steps``
  steps. (The gymnasium vector path the sampler replaced measured 34,000-54,000 half-cheetah
  steps/s here: BENCHMARKS.md.)

Steps/s counts the steps episodes really took (``mask.sum()``: ant episodes end early and the
samplers stop stepping them). Each row: best and median of ``--repeats`` rollouts after one
warm-up, and the 1-minute load average before the row.

``--policy`` times the ways to call the policy on all episodes with per-task parameters instead.
``--sim`` times the simulator designs alone instead (random actions, no policy, tasks × trajectories
copies, ``--sim-steps`` steps from gymnasium's reset distribution): ``mujoco.rollout`` with its
persistent thread pool (one call per environment step; it cannot carry the solver's warm start
from call to call, so it is not bit-identical to gymnasium), ``mujoco.batch.Batch`` (MuJoCo >= 4),
the ant's ``mjBatch`` through MuJoCo's C API (``mjb_step`` + ``mjb_apply(mj_rnePostConstraint)``),
and ``mj_step`` (+ ``mj_rnePostConstraint`` for the ant) on one ``MjData`` per copy from Python
threads, for each ``--sim-threads`` count.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/rl_batched_sampler.py [--families halfcheetah_vel,ant_vel]
        [--sim-threads 1,2] [--torch-threads 1] [--repeats 3] [--gym-steps 20000]
        [--shared] [--sim [--sim-steps 50]] [--policy]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def policy_and_params(obs_dim: int, act_dim: int, n_tasks: int, seed: int = 0):
    from mamlkit.engine.functional import FunctionalModel
    from mamlkit.rl.policy import GaussianMLPPolicy

    torch.manual_seed(seed)
    fm = FunctionalModel(GaussianMLPPolicy(obs_dim, act_dim))
    base = {k: v.detach() for k, v in fm.params().items()}
    per_task = [{k: v + 0.01 * torch.randn_like(v) for k, v in base.items()} for _ in range(n_tasks)]
    return fm, base, per_task


def time_rollouts(family, fm, params, tasks: torch.Tensor, trajectories: int, repeats: int) -> tuple[float, float, int]:
    """(best, median) valid env steps/s over ``repeats`` rollouts after a warm-up; steps per rollout."""
    seeds = torch.arange(len(tasks)) * 1000
    family.rollout(fm, params, tasks, trajectories, seeds)  # warm-up (and the lazily built copies)
    rates, steps = [], 0
    for i in range(repeats):
        t0 = time.perf_counter()
        ep = family.rollout(fm, params, tasks, trajectories, seeds + i + 1)
        dt = time.perf_counter() - t0
        steps = int(ep.mask.sum())
        rates.append(steps / dt)
    return max(rates), float(np.median(rates)), steps


def bench_simulators(name: str, n: int, threads_list: list[int], steps: int, repeats: int) -> None:
    """Env steps/s of each simulator design alone (random actions in the bounds, no policy)."""
    import mujoco
    import mujoco.rollout

    from mamlkit.rl.mujoco_batch import BatchedMujoco
    from mamlkit.rl.mujoco_sim import _CapiSim, _ThreadSim, has_batch, has_capi

    env = BatchedMujoco(name, 1, threads=1, backend="threads")
    m, fs, ant = env.model, env.frame_skip, env.family.ant
    rng = np.random.default_rng(0)
    qpos0 = env.init_qpos + rng.uniform(-0.1, 0.1, (n, m.nq))
    qvel0 = 0.1 * rng.standard_normal((n, m.nv))
    ids = np.arange(n)

    def rate(run) -> tuple[float, float]:
        run()
        r = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            r.append(n * steps / (time.perf_counter() - t0))
        return max(r), float(np.median(r))

    for threads in threads_list:
        rows = []
        # mujoco.rollout: full physics state in and out, one call per environment step
        datas = [mujoco.MjData(m) for _ in range(threads)]
        spec = mujoco.mjtState.mjSTATE_FULLPHYSICS
        state0 = np.empty((n, mujoco.mj_stateSize(m, spec)))
        d = mujoco.MjData(m)
        for i in range(n):
            d.qpos[:], d.qvel[:] = qpos0[i], qvel0[i]
            mujoco.mj_getState(m, d, state0[i], spec)

        def run_rollout(datas=datas, state0=state0):
            state = state0
            for _ in range(steps):
                ctrl = rng.uniform(-1, 1, (n, 1, m.nu))
                out, _ = mujoco.rollout.rollout(m, datas, state, ctrl, nstep=fs, persistent_pool=True)
                state = out[:, -1]

        rows.append(("mujoco.rollout, persistent pool", rate(run_rollout)))
        mujoco.rollout.shutdown_persistent_pool()
        if has_batch() and not ant:
            from mujoco.batch import Batch

            b = Batch(m, n, threads)
            qpos, qvel, ctrl = b.bind("qpos"), b.bind("qvel"), b.bind("ctrl")

            def run_batch(b=b, qpos=qpos, qvel=qvel, ctrl=ctrl):
                b.reset()
                qpos[:], qvel[:] = qpos0, qvel0
                for _ in range(steps):
                    ctrl[:] = rng.uniform(-1, 1, (n, m.nu))
                    b.step(nstep=fs)
                    np.concatenate([qpos[:, 1:], qvel], 1)  # what an observation costs

            rows.append(("mujoco.batch.Batch", rate(run_batch)))
        if has_capi() and ant:
            capi = _CapiSim(m, n, threads, fs)

            def run_capi(capi=capi):
                capi.reset(ids, qpos0, qvel0)
                for _ in range(steps):
                    capi.step(ids, rng.uniform(-1, 1, (n, m.nu)))

            rows.append(("mjBatch C API: mjb_step + mjb_apply(mj_rnePostConstraint)", rate(run_capi)))
            capi.close()
        sim = _ThreadSim(m, n, threads, fs, need_cfrc=ant)

        def run_threads(sim=sim):
            sim.reset(ids, qpos0, qvel0)
            for _ in range(steps):
                sim.step(ids, rng.uniform(-1, 1, (n, m.nu)))

        label = "mj_step" + (" + mj_rnePostConstraint" if ant else "") + " over MjData, Python threads"
        rows.append((label, rate(run_threads)))
        sim.close()
        for label, (best, med) in rows:
            print(f"| {name} | {label} | {threads} | {best:,.0f} | {med:,.0f} | {load()} |", flush=True)


def bench_policy(n_tasks: int, trajectories: int, repeats: int) -> None:
    """Microseconds per policy call on ``obs [tasks, trajectories, d]``, each task its parameters."""
    from mamlkit.rl.policy import TaskPolicy

    for label, d, a in (("half-cheetah", 17, 6), ("ant", 105, 8)):
        fm, base, per_task = policy_and_params(d, a, n_tasks)
        obs = torch.randn(n_tasks, trajectories, d)
        fast, vmapped, shared = TaskPolicy(fm, per_task), TaskPolicy(fm, per_task), TaskPolicy(fm, base)
        vmapped.layers = None
        every = slice(0, n_tasks)

        def per_call(obs=obs, fm=fm, per_task=per_task):
            return [fm(p, o) for p, o in zip(per_task, obs)]

        ways = {
            "per task, batched matmuls (baddbmm)": lambda f=fast, o=obs, e=every: f(o, e),
            "per task, torch.func.vmap over stacked params": lambda f=vmapped, o=obs, e=every: f(o, e),
            "per task, one call per task": per_call,
            "shared, one call": lambda f=shared, o=obs, e=every: f(o, e),
        }
        for way, fn in ways.items():
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(50):
                    fn()
                times.append((time.perf_counter() - t0) / 50 * 1e6)
            print(f"| {label} (d={d}) | {way} | {min(times):.0f} | {np.median(times):.0f} | {load()} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="halfcheetah_vel,ant_vel")
    p.add_argument("--tasks", type=int, default=40)
    p.add_argument("--trajectories", type=int, default=20)
    p.add_argument("--horizon", type=int, default=200)
    p.add_argument("--sim-threads", default="1,2", help="simulation threads of the batched sampler")
    p.add_argument("--backend", default=None, help="batched sampler back end: batch or threads (default: per family)")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gym-steps", type=int, default=20000, help="steps of the gymnasium reference row (0: skip)")
    p.add_argument("--shared", action="store_true", help="also time one parameter set for all tasks")
    p.add_argument("--sim", action="store_true", help="time the simulator designs alone instead")
    p.add_argument("--policy", action="store_true", help="time the ways to call per-task policies instead")
    p.add_argument("--sim-steps", type=int, default=50, help="--sim: environment steps per timed run")
    args = p.parse_args()
    torch.set_num_threads(args.torch_threads)

    import gymnasium as gym
    import mujoco

    from mamlkit.experiments import load_config
    from mamlkit.rl import envs  # noqa: F401  (registers mamlkit's environments)
    from mamlkit.rl.families import MUJOCO
    from mamlkit.rl.tasks import make_tasks

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), mujoco {mujoco.__version__}, gymnasium {gym.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}; load {load()}"
    )
    if args.policy:
        print(f"# policy calls on {args.tasks} tasks x {args.trajectories} observations\n")
        print("| observations | policy call | best µs | median µs | load after |")
        print("|---|---|---:|---:|---|")
        bench_policy(args.tasks, args.trajectories, args.repeats)
        return
    if args.sim:
        n = args.tasks * args.trajectories
        print(f"# simulators alone: {n} copies, {args.sim_steps} steps, random actions\n")
        print("| family | simulator | threads | best steps/s | median steps/s | load after |")
        print("|---|---|---:|---:|---:|---|")
        for name in args.families.split(","):
            bench_simulators(name, n, [int(x) for x in args.sim_threads.split(",")], args.sim_steps, args.repeats)
        return
    print(f"# meta-batch {args.tasks} tasks x {args.trajectories} trajectories x {args.horizon} steps\n")
    print("| family | sampler | params | best steps/s | median steps/s | steps | load before |")
    print("|---|---|---|---:|---:|---:|---|")
    for name in args.families.split(","):
        preset = "rl-" + name.replace("_", "-")
        g = torch.Generator().manual_seed(1)
        for threads in [int(x) for x in args.sim_threads.split(",")]:
            cfg = load_config(preset, [f"env.horizon={args.horizon}", f"env.sim_threads={threads}"])
            fam = make_tasks(cfg.env)
            tasks = fam.sample(args.tasks, g)
            fm, base, per_task = policy_and_params(fam.obs_dim, fam.act_dim, args.tasks)
            for label, params in [("per task", per_task)] + ([("shared", base)] if args.shared else []):
                before = load()
                best, med, steps = time_rollouts(fam, fm, params, tasks, args.trajectories, args.repeats)
                backend = fam._sim.backend
                row = f"batched ({backend}), {threads} sim thread{'s' if threads > 1 else ''}"
                print(f"| {name} | {row} | {label} | {best:,.0f} | {med:,.0f} | {steps:,} | {before} |", flush=True)
            fam._sim.close()
        # The reference: one gymnasium environment stepped one step at a time, random actions, no
        # policy: mamlkit's (the training simulation step) and gymnasium's own (its 5x longer step).
        robot = {"halfcheetah": "HalfCheetah-v5", "ant": "Ant-v5"}[MUJOCO[name].robot]
        for env_id in [MUJOCO[name].env_id, robot][: 2 if args.gym_steps else 0]:
            before = load()
            env = gym.make(env_id)
            env.reset(seed=0)
            actions = np.random.default_rng(0).uniform(-1, 1, (args.gym_steps, *env.action_space.shape))
            t0 = time.perf_counter()
            for a in actions:
                if any(env.step(a)[2:4]):
                    env.reset()
            rate = args.gym_steps / (time.perf_counter() - t0)
            row = f"gymnasium {env_id}, one env stepped one step at a time (no policy)"
            print(f"| {name} | {row} | – | {rate:,.0f} | | {args.gym_steps:,} | {before} |", flush=True)
    print(f"\n# load at the end {load()}")


if __name__ == "__main__":
    main()
