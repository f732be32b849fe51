"""Relative difference of the vmap and loop meta-gradients of one batch, in float32 and float64,
from the float64 loop's.

A float32 difference that vanishes in float64 is rounding, not a wrong gradient (peers_speed.py's
"grad matches" column compares the float32 strategies with each other only).

    python benchmarks/strategy_agreement.py [--workload miniimagenet-5way-1shot] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy

import torch
from peers_speed import WORKLOADS

from mamlkit import MAML


def meta_gradient(net: torch.nn.Module, workload, batch, strategy: str) -> torch.Tensor:
    net = copy.deepcopy(net)
    maml = MAML(net, workload.loss, inner_lr=workload.inner_lr, inner_steps=workload.inner_steps, strategy=strategy)
    maml.meta_backward(batch)
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=list(WORKLOADS), default="miniimagenet-5way-1shot")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    w = WORKLOADS[args.workload]
    grads = {}
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(args.seed)
        net = w.make_net().to(dtype)
        batch = w.sample(w.meta_batch, torch.Generator().manual_seed(args.seed), "cpu")
        batch = type(batch)(*(t.to(dtype) if t.is_floating_point() else t for t in batch))
        for strategy in ("loop", "vmap"):
            grads[strategy, dtype] = meta_gradient(net, w, batch, strategy).double()
    exact = grads["loop", torch.float64]
    for (strategy, dtype), g in grads.items():
        error = (g - exact).norm() / exact.norm()
        print(f"{args.workload} {strategy:4s} {dtype}: relative error against the float64 loop {error:.1e}")


if __name__ == "__main__":
    main()
