"""Environment steps per second for mamlkit's RL samplers, and seconds per meta-iteration.

Environment rows: the torch-batched 2D navigation sampler (tasks × trajectories stepped at once,
with the policy), the gymnasium Navigation2D env stepped one at a time (random actions), and
the MuJoCo task environments through gymnasium's vector API, synchronous (one process) against
asynchronous (one worker process per copy), with random actions. Meta-iteration rows: one full
navigation meta-iteration (sampling, inner step, TRPO) at the paper's sizes.

Usage:
    python benchmarks/rl_speed.py [--seconds 5] [--envs 2,4] [--only nav,mujoco,meta] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import gymnasium as gym
import numpy as np
import torch


def timed(fn, seconds: float) -> tuple[float, int]:
    """Calls ``fn`` (returning a step count) until ``seconds`` have passed; (elapsed, steps)."""
    fn()  # warm up
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        steps += fn()
    return time.perf_counter() - t0, steps


def bench_navigation(seconds: float) -> list[tuple[str, float]]:
    from mamlkit.engine.functional import FunctionalModel
    from mamlkit.rl import envs
    from mamlkit.rl.navigation import NavigationBatch, sample_goals
    from mamlkit.rl.policy import GaussianMLPPolicy
    from mamlkit.rl.sampler import policy_fn, rollout

    g = torch.Generator().manual_seed(0)
    fm = FunctionalModel(GaussianMLPPolicy(2, 2))
    params = [{k: v.detach() for k, v in fm.params().items()}] * 20
    env = NavigationBatch(sample_goals(20, g), 20)
    dt, n = timed(lambda: rollout(policy_fn(fm, params), env, 100, g).mask.numel(), seconds)
    rows = [("navigation, torch batch 20 tasks x 20 trajectories, with policy", n / dt)]
    single = gym.make(envs.NAVIGATION)
    single.reset(seed=0)

    def hundred() -> int:
        single.reset()
        for _ in range(100):
            single.step(single.action_space.sample())
        return 100

    dt, n = timed(hundred, seconds)
    rows.append(("navigation, gymnasium env, one at a time, random actions", n / dt))
    return rows


def bench_mujoco(seconds: float, env_counts: list[int]) -> list[tuple[str, float]]:
    from mamlkit.rl.vector_sampler import make_vector_env

    rows = []
    for env_id in ("mamlkit/HalfCheetahVel-v0", "mamlkit/AntVel-v0"):
        for n_envs in env_counts:
            for asynchronous in (False, True):
                vec = make_vector_env(env_id, n_envs, asynchronous)
                vec.reset(seed=0)
                rng = np.random.default_rng(0)
                shape = (n_envs, *vec.single_action_space.shape)

                def hundred(vec=vec, rng=rng, shape=shape) -> int:
                    for _ in range(100):
                        vec.step(rng.uniform(-1, 1, shape).astype(np.float32))
                    return 100 * shape[0]

                dt, n = timed(hundred, seconds)
                vec.close()
                kind = "async" if asynchronous else "sync"
                rows.append((f"{env_id.split('/')[1]}, {n_envs} envs, {kind}, random actions", n / dt))
    return rows


def bench_meta_iteration(iterations: int) -> list[tuple[str, float]]:
    from mamlkit.experiments import load_config, rl
    from mamlkit.rl.tasks import make_tasks

    rows = []
    for first_order in (False, True):
        cfg = load_config("rl-navigation2d", [f"maml.first_order={str(first_order).lower()}"])
        torch.manual_seed(0)
        family = make_tasks(cfg.env)
        learner = rl.make_learner(cfg, "maml", family)
        update = rl.make_update(cfg, learner, family)
        g = torch.Generator().manual_seed(0)
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            update.step(g)
            times.append(time.perf_counter() - t0)
        label = "first-order" if first_order else "second-order"
        rows.append(
            (
                f"navigation meta-iteration, MAML {label}, 20 tasks x 20 trajectories (s/it, median)",
                float(np.median(times)),
            )
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="timing window per row")
    p.add_argument("--envs", default="2,4", help="vector env sizes for MuJoCo")
    p.add_argument("--only", default="nav,mujoco,meta")
    p.add_argument("--iterations", type=int, default=3, help="meta-iterations timed")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"gymnasium {gym.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}"
    )
    rows = []
    if "nav" in only:
        rows += [(n, v, "steps/s") for n, v in bench_navigation(args.seconds)]
    if "mujoco" in only:
        rows += [(n, v, "steps/s") for n, v in bench_mujoco(args.seconds, [int(x) for x in args.envs.split(",")])]
    if "meta" in only:
        rows += [(n, v, "s") for n, v in bench_meta_iteration(args.iterations)]
    print("| workload | value | unit |\n|---|---|---|")
    for name, value, unit in rows:
        print(f"| {name} | {value:,.1f} | {unit} |")


if __name__ == "__main__":
    main()
