"""TRPO's KL Hessian-vector product with each task computed in a loop or under vmap.

A half-cheetah-shaped meta-batch (``--tasks`` × ``--trajectories`` × ``--horizon`` steps, 17-dim observations,
6-dim actions, 2×100 policy) of random data: time the policy outputs through the second-order
inner step, the KL product set-up and ``--products`` products, for each strategy; check that
the strategies' products agree; then time the product's ``J v`` by a backward pass (as
``kl_hvp``) against forward mode.

Usage:
    python benchmarks/trpo_strategies.py [--tasks 40] [--products 3] [--threads 1] [--trajectories 20] [--horizon 200]
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=40)
    p.add_argument("--products", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--trajectories", type=int, default=20, help="per task")
    p.add_argument("--horizon", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from torch.nn.utils import parameters_to_vector

    from mamlkit import MAML
    from mamlkit.rl.policy import GaussianMLPPolicy, reinforce_loss
    from mamlkit.rl.trpo import MetaTRPO, TaskData

    t, n, h, d, a = args.tasks, args.trajectories, args.horizon, 17, 6
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    maml = MAML(GaussianMLPPolicy(d, a, (100, 100)), reinforce_loss, inner_lr=0.1, strategy="loop")
    mask = torch.ones(t, n, h)
    with torch.no_grad():
        old_mean, old_log_std = maml(r(t, n, h, d))
    data = TaskData(r(t, n, h, d), (r(t, n, h, a), r(t, n, h), mask), r(t, n, h, d), r(t, n, h, a), r(t, n, h), mask,
                    old_mean, old_log_std)  # fmt: skip
    print(f"# {t} tasks x {n} x {h}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    print("| strategy | outputs + meta-gradient (s) | product set-up (s) | one product (s) |\n|---|---:|---:|---:|")
    products = {}
    for strategy in ("loop", "vmap"):
        trpo = MetaTRPO(maml, strategy=strategy)
        params = maml.params()
        t0 = time.perf_counter()
        outputs = trpo.policy_outputs(data, params, create_graph=True)
        surr, _ = trpo.surrogate_and_kl(data, outputs)
        v = parameters_to_vector(torch.autograd.grad(surr, list(params.values()), retain_graph=True))
        t1 = time.perf_counter()
        hvp = trpo.kl_hvp(data, params, True, outputs)
        t2 = time.perf_counter()
        for _ in range(args.products):
            products[strategy] = hvp(v)
        t3 = time.perf_counter()
        print(f"| {strategy} | {t1 - t0:.2f} | {t2 - t1:.2f} | {(t3 - t2) / args.products:.2f} |", flush=True)
    diff = (products["loop"] - products["vmap"]).abs().max() / products["loop"].abs().max()
    print(f"\nthe two strategies' products agree to {diff:.1e} (relative to the largest element)")
    forward_mode_jv(maml, data, v, args.products)


def forward_mode_jv(maml, data, v, products: int) -> None:
    """The alternative to ``kl_hvp``'s ``J v`` (a backward pass through ``J^T u`` with respect to
    ``u``): forward mode, ``torch.func.jvp`` through the inner step (loop strategy)."""
    from mamlkit.rl.trpo import MetaTRPO

    trpo = MetaTRPO(maml, strategy="loop")
    params = maml.params()
    leaves = list(params.values())
    outputs = trpo.policy_outputs(data, params, create_graph=True)
    dummies = [torch.zeros_like(o, requires_grad=True) for o in outputs]
    jt = torch.autograd.grad(outputs, leaves, dummies, create_graph=True)
    vs = [x.view_as(p) for x, p in zip(torch.split(v, [p.numel() for p in leaves]), leaves)]
    t0 = time.perf_counter()
    for _ in range(products):
        backward = torch.autograd.grad(jt, dummies, vs, retain_graph=True)
    t1 = time.perf_counter()
    detached = {k: p.detach() for k, p in params.items()}
    tangents = dict(zip(params, vs))
    for _ in range(products):
        _, forward = torch.func.jvp(lambda p: trpo.policy_outputs(data, p, True), (detached,), (tangents,))
    t2 = time.perf_counter()
    diff = max(((x - y).abs().max() / x.abs().max()).item() for x, y in zip(backward, forward))
    print(f"J v alone (loop): backward through J^T u {(t1 - t0) / products:.2f} s, "
          f"forward mode (torch.func.jvp) {(t2 - t1) / products:.2f} s; they agree to {diff:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
