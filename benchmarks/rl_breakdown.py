"""Where one meta-iteration of an RL preset spends its time.

Wraps the real functions with timers (nothing is re-implemented here) and runs
``--iterations`` meta-iterations of the MAML model: sampling (pre- and post-update rollouts),
advantages (returns, baseline fits, GAE), the inner adaptation of ``collect``, and TRPO's
parts: the surrogate with its graph through the inner step, the meta-gradient, the KL
Hessian-vector product set-up, conjugate gradient (the products) and the line search.

Usage:
    python benchmarks/rl_breakdown.py [--preset rl-halfcheetah-vel] [--threads 1] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

TIMES: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


@contextmanager
def timer(name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        TIMES[name] += time.perf_counter() - t0
        CALLS[name] += 1


def wrap(owner, attr: str, name: str) -> None:
    """Replace ``owner.attr`` by a timed version of itself."""
    fn = getattr(owner, attr)

    def timed(*args, **kwargs):
        with timer(name):
            return fn(*args, **kwargs)

    setattr(owner, attr, timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="rl-halfcheetah-vel")
    p.add_argument("--iterations", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the presets use 1)")
    p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from mamlkit import config
    from mamlkit.experiments import rl
    from mamlkit.rl import trpo as trpo_mod
    from mamlkit.rl.tasks import make_tasks

    cfg = config.load(args.preset, args.set)
    torch.manual_seed(cfg.train.seed)
    family = make_tasks(cfg.env)
    learner = rl.make_learner(cfg, "maml", family)
    trpo = rl.make_trpo(cfg, learner)
    g = torch.Generator().manual_seed(cfg.train.seed + 100)

    wrap(family, "rollout", "sampling")
    wrap(rl, "_advantages", "advantages")
    wrap(learner, "adapt", "inner adaptation (collect + TRPO graphs)")
    wrap(trpo, "objectives", "surrogate/KL forward (incl. line search)")
    wrap(trpo, "kl_hvp", "KL HVP set-up")
    wrap(trpo_mod, "conjugate_gradient", "conjugate gradient (HVPs)")
    if hasattr(trpo, "line_search"):
        wrap(trpo, "line_search", "line search")

    for it in range(args.iterations):
        TIMES.clear()
        CALLS.clear()
        t0 = time.perf_counter()
        goals = family.sample(cfg.train.meta_batch_size, g)
        with timer("collect (total)"):
            tasks, info = rl.collect(cfg, learner, family, goals, g)
        with timer("TRPO step (total)"):
            stats = trpo.step(tasks)
        total = time.perf_counter() - t0
        print(f"# {args.preset} iteration {it + 1}: {total:.1f} s, threads {torch.get_num_threads()}, stats {stats}")
        print("| part | s | calls |\n|---|---:|---:|")
        for name, s in sorted(TIMES.items(), key=lambda kv: -kv[1]):
            print(f"| {name} | {s:.2f} | {CALLS[name]} |")


if __name__ == "__main__":
    main()
