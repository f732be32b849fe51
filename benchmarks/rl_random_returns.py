"""Returns of a random policy (N(0, 1) actions, like rllab's initial std-1 policy) on the MuJoCo
task environments, at their simulation step and at gymnasium's 0.05 s, for comparison with the
paper's random-initialisation returns before any update (RESULTS.md).

    python benchmarks/rl_random_returns.py [--tasks 40] [--seed 0] [--horizon 200]
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np

from mamlkit.rl import envs  # noqa: F401  (registers the environments)

NAMES = ["mamlkit/HalfCheetahVel-v0", "mamlkit/HalfCheetahDir-v0", "mamlkit/AntVel-v0", "mamlkit/AntDir-v0"]


def random_returns(name: str, tasks: int, seed: int, horizon: int = 200, **kwargs) -> tuple[float, float, float, float]:
    """``(mean return, 95% CI, mean episode length, dt)`` over ``tasks`` sampled tasks, one episode each."""
    env = gym.make(name, **kwargs)
    rng = np.random.default_rng(seed)
    returns, lengths = [], []
    for i, task in enumerate(env.unwrapped.sample_tasks(tasks, rng)):
        env.unwrapped.set_task(task)
        env.reset(seed=seed + i)
        total, steps = 0.0, 0
        while steps < horizon:
            _, reward, terminated, _, _ = env.step(rng.normal(size=env.action_space.shape))
            total, steps = total + reward, steps + 1
            if terminated:
                break
        returns.append(total)
        lengths.append(steps)
    r = np.asarray(returns)
    return r.mean(), 1.96 * r.std() / np.sqrt(len(r)), float(np.mean(lengths)), env.unwrapped.dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--horizon", type=int, default=200, help="steps per episode at most")
    args = p.parse_args()
    print("| environment | dt (s) | return ± 95% CI | mean episode length |\n|---|---|---|---|")
    for name in NAMES:
        for kwargs in ({}, {"frame_skip": 5}):
            mean, ci, length, dt = random_returns(name, args.tasks, args.seed, args.horizon, **kwargs)
            print(f"| {name} | {dt:.2f} | {mean:.1f} ± {ci:.1f} | {length:.0f} |")


if __name__ == "__main__":
    main()
