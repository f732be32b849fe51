"""2D navigation: environment steps per second of mamlkit's sampler, and seconds per meta-iteration.

Environment rows: the torch-batched 2D navigation sampler (tasks × trajectories stepped at once,
with the policy) and the gymnasium Navigation2D env stepped one at a time (random actions).
Meta-iteration rows: one full navigation meta-iteration (sampling, inner step, TRPO) at the
paper's sizes (``--set`` changes them). The MuJoCo sampler has its own script, ``benchmarks/rl_batched_sampler.py``.

Usage:
    python benchmarks/rl_speed.py [--seconds 5] [--only nav,meta] [--threads 1]
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
    from mamlkit.rl.policy import GaussianMLPPolicy, TaskPolicy
    from mamlkit.rl.sampler import rollout

    g = torch.Generator().manual_seed(0)
    fm = FunctionalModel(GaussianMLPPolicy(2, 2))
    params = [{k: v.detach() for k, v in fm.params().items()}] * 20
    env = NavigationBatch(sample_goals(20, g), 20)
    dt, n = timed(
        lambda: rollout(TaskPolicy(fm, params), env, torch.randn(20, 20, 100, 2, generator=g)).mask.numel(), seconds
    )
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


def bench_meta_iteration(iterations: int, sets: list[str]) -> list[tuple[str, float]]:
    from mamlkit.experiments import load_config, rl
    from mamlkit.rl.tasks import make_tasks

    rows = []
    for first_order in (False, True):
        cfg = load_config("rl-navigation2d", [f"maml.first_order={str(first_order).lower()}", *sets])
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
                f"navigation meta-iteration, MAML {label}, {cfg.train.meta_batch_size} tasks x "
                f"{cfg.train.trajectories} trajectories (s/it, median)",
                float(np.median(times)),
            )
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="timing window per row")
    p.add_argument("--only", default="nav,meta")
    p.add_argument("--iterations", type=int, default=3, help="meta-iterations timed")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="meta-iteration config override")
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
    if "meta" in only:
        rows += [(n, v, "s") for n, v in bench_meta_iteration(args.iterations, args.set)]
    print("| workload | value | unit |\n|---|---|---|")
    for name, value, unit in rows:
        print(f"| {name} | {value:,.1f} | {unit} |")


if __name__ == "__main__":
    main()
