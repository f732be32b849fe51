"""Env steps per second of the batched MuJoCo sampler against the gymnasium vector path, policy in the loop.

Samples a meta-batch (``--tasks`` × ``--trajectories`` × ``--horizon``) of each family with the
2×100 Gaussian MLP, every task with its own parameters (as after the inner update; ``--shared``
adds rows with one parameter set for all tasks, as before it):

- new: ``mujoco_batch.BatchedMujocoTasks.rollout`` (all episodes stepped together), for each
  ``--sim-threads`` count;
- old: ``tasks.make_tasks(cfg.env).rollout`` from the family's preset, as the training loop
  calls it, with the preset's env settings and with each ``--old`` override set (on
  ``--old-tasks`` tasks to keep the run short; the rate does not depend on the task count).

Steps/s counts the steps episodes really took (``mask.sum()``: ant episodes end early and the
samplers stop stepping them). Each row: best and median of ``--repeats`` rollouts after one
warm-up, and the 1-minute load average before the row.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/rl_batched_sampler.py [--families halfcheetah_vel,ant_vel]
        [--sim-threads 1,2] [--torch-threads 1] [--repeats 3] [--old-tasks 10]
        [--old "env.num_envs=40 env.processes=2"] [--shared]
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
    g = torch.Generator().manual_seed(0)
    family.rollout(fm, params, tasks, trajectories, g)  # warm-up (and the lazily built copies)
    rates, steps = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        ep = family.rollout(fm, params, tasks, trajectories, g)
        dt = time.perf_counter() - t0
        steps = int(ep.mask.sum())
        rates.append(steps / dt)
    return max(rates), float(np.median(rates)), steps


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
    p.add_argument("--old-tasks", type=int, default=10, help="tasks of the old path's meta-batch (0: skip it)")
    p.add_argument(
        "--old",
        action="append",
        default=None,
        help="space-separated config overrides of an extra old-path row (default: 'env.num_envs=40 env.processes=2')",
    )
    p.add_argument("--shared", action="store_true", help="also time one parameter set for all tasks")
    args = p.parse_args()
    torch.set_num_threads(args.torch_threads)

    import gymnasium as gym
    import mujoco

    from mamlkit import config
    from mamlkit.rl.mujoco_batch import BatchedMujocoTasks
    from mamlkit.rl.tasks import make_tasks

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), mujoco {mujoco.__version__}, gymnasium {gym.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}; load {load()}"
    )
    print(f"# meta-batch {args.tasks} tasks x {args.trajectories} trajectories x {args.horizon} steps\n")
    print("| family | sampler | params | best steps/s | median steps/s | steps | load before |")
    print("|---|---|---|---:|---:|---:|---|")
    old_rows = args.old if args.old is not None else ["env.num_envs=40 env.processes=2"]
    for name in args.families.split(","):
        preset = "rl-" + name.replace("_", "-")
        cfg = config.load(preset, [f"env.horizon={args.horizon}"])
        g = torch.Generator().manual_seed(1)
        for threads in [int(x) for x in args.sim_threads.split(",")]:
            fam = BatchedMujocoTasks(cfg.env, threads=threads, backend=args.backend)
            tasks = fam.sample(args.tasks, g)
            fm, base, per_task = policy_and_params(fam.obs_dim, fam.act_dim, args.tasks)
            for label, params in [("per task", per_task)] + ([("shared", base)] if args.shared else []):
                before = load()
                best, med, steps = time_rollouts(fam, fm, params, tasks, args.trajectories, args.repeats)
                backend = fam._sim.backend
                row = f"batched ({backend}), {threads} sim thread{'s' if threads > 1 else ''}"
                print(f"| {name} | {row} | {label} | {best:,.0f} | {med:,.0f} | {steps:,} | {before} |", flush=True)
            fam._sim.close()
        if args.old_tasks:
            for overrides in ["", *old_rows]:
                ocfg = config.load(preset, [f"env.horizon={args.horizon}", *overrides.split()])
                fam = make_tasks(ocfg.env)
                tasks = fam.sample(args.old_tasks, g)
                fm, _, per_task = policy_and_params(fam.obs_dim, fam.act_dim, args.old_tasks)
                before = load()
                best, med, steps = time_rollouts(fam, fm, per_task, tasks, args.trajectories, args.repeats)
                e = ocfg.env
                row = f"gymnasium vector (num_envs={e.num_envs}, processes={e.processes})"
                print(f"| {name} | {row} | per task | {best:,.0f} | {med:,.0f} | {steps:,} | {before} |", flush=True)
                if hasattr(fam.vec, "close"):
                    fam.vec.close()
    print(f"\n# load at the end {load()}")


if __name__ == "__main__":
    main()
