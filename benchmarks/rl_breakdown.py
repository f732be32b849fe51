"""Where one meta-iteration of an RL preset spends its time.

Wraps the real functions with timers (nothing is re-implemented here) and runs
``--iterations`` meta-iterations of the MAML model. Each part's time excludes the wrapped
parts called inside it, so the rows add up to the iteration:

- sampling: pre- and post-update rollouts (``family.rollout``)
- advantages: returns, linear baseline fits, GAE
- inner adaptation: every ``MAML.adapt`` (``sample_meta_batch``'s, and those TRPO builds through)
- policy outputs: the post-update policy on the post-update observations (TRPO)
- KL HVP set-up: the ``J^T u`` graph; conjugate gradient: the Hessian-vector products
- line search: its surrogate and KL evaluations (minus their inner adaptations)
- collect other / TRPO other: the rest (old policy outputs; surrogate, meta-gradient)

Usage:
    python benchmarks/rl_breakdown.py [--preset rl-halfcheetah-vel] [--threads 1] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

TIMES: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
_STACK: list[list[float]] = []  # per active timer: [start, time spent in nested timers]


def timed(name: str, fn):
    """``fn`` with its time, less nested timed calls, added to ``TIMES[name]``."""

    def run(*args, **kwargs):
        _STACK.append([time.perf_counter(), 0.0])
        try:
            return fn(*args, **kwargs)
        finally:
            start, nested = _STACK.pop()
            total = time.perf_counter() - start
            TIMES[name] += total - nested
            CALLS[name] += 1
            if _STACK:
                _STACK[-1][1] += total

    return run


def wrap(owner, attr: str, name: str) -> None:
    if hasattr(owner, attr):
        setattr(owner, attr, timed(name, getattr(owner, attr)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="rl-halfcheetah-vel")
    p.add_argument("--iterations", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (MuJoCo presets: 0, every core)")
    p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from mamlkit.experiments import load_config, rl
    from mamlkit.rl import metabatch
    from mamlkit.rl import trpo as trpo_mod
    from mamlkit.rl.tasks import make_tasks

    cfg = load_config(args.preset, args.set)
    torch.manual_seed(cfg.train.seed)
    family = make_tasks(cfg.env)
    learner = rl.make_learner(cfg, "maml", family)
    update = rl.make_update(cfg, learner, family)
    trpo = update.trpo
    g = torch.Generator().manual_seed(cfg.train.seed + 100)

    wrap(family, "rollout", "sampling")
    update.adv = timed("advantages", update.adv)
    wrap(learner, "adapt", "inner adaptation")
    wrap(trpo, "policy_outputs", "policy outputs (TRPO, incl. line search)")
    wrap(trpo, "kl_hvp", "KL HVP set-up")
    wrap(trpo_mod, "conjugate_gradient", "conjugate gradient (HVPs)")
    wrap(trpo_mod, "conjugate_gradient_with_product", "conjugate gradient (HVPs)")
    wrap(trpo, "line_search", "line search")
    collect = timed("collect other", metabatch.sample_meta_batch)
    step = timed("TRPO other (surrogate, meta-gradient)", trpo.step)

    for it in range(args.iterations):
        TIMES.clear()
        CALLS.clear()
        t0 = time.perf_counter()
        goals = family.sample(cfg.train.meta_batch_size, g)
        seeds = torch.randint(2**30, (2, len(goals)), generator=g)
        tasks, info = collect(learner, family, goals, cfg.train.trajectories, update.adv, seeds)
        t1 = time.perf_counter()
        stats = step(tasks)
        t2 = time.perf_counter()
        print(
            f"# {args.preset} iteration {it + 1}: {t2 - t0:.1f} s (collect {t1 - t0:.1f} s, TRPO {t2 - t1:.1f} s), "
            f"threads {torch.get_num_threads()}, {stats}"
        )
        print("| part | s | calls |\n|---|---:|---:|")
        for name, s in sorted(TIMES.items(), key=lambda kv: -kv[1]):
            print(f"| {name} | {s:.2f} | {CALLS[name]} |")


if __name__ == "__main__":
    main()
