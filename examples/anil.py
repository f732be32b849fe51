"""ANIL (Raghu et al., 2020) through parameter globs, compared with full MAML.

Shows: ``MAML(..., adapt=["head.*"])`` adapts only the last layer in the inner loop (Almost No
Inner Loop) while every parameter is still meta-learned; ``maml.adapted_names`` lists what a
pattern selected. Both learners train from the same initial weights on sinusoid regression
(``mamlkit.tasks.SinusoidTasks``, the paper's tasks); the script prints each one's query MSE
before and after adaptation on the same test tasks, and its time per meta-iteration.

    python examples/anil.py            # a few minutes on a CPU
    python examples/anil.py --quick    # a few seconds
"""

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from mamlkit import MAML
from mamlkit.tasks import SinusoidTasks


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU())
        self.head = nn.Linear(40, 1)

    def forward(self, x):
        return self.head(self.body(x))


def train(maml: MAML, tasks: SinusoidTasks, iterations: int) -> float:
    """Meta-train ``maml``; returns seconds per meta-iteration."""
    g = torch.Generator().manual_seed(1)  # the same task stream for both learners
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(iterations):
        loss = maml.meta_loss(tasks.batch(10, 10, 10, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: fewer iterations and test tasks")
    args = parser.parse_args()
    iterations, test_tasks = (200, 100) if args.quick else (20000, 600)
    torch.manual_seed(0)
    init = Net()
    tasks = SinusoidTasks()
    test = tasks.batch(test_tasks, 10, 100, torch.Generator().manual_seed(2))

    learners = {
        "maml": MAML(copy.deepcopy(init), F.mse_loss, inner_lr=0.01, inner_steps=1),
        # Glob patterns over parameter names; a leading "!" excludes (e.g. ["*", "!body.0.*"]).
        "anil": MAML(copy.deepcopy(init), F.mse_loss, inner_lr=0.01, inner_steps=1, adapt=["head.*"]),
    }
    for name, maml in learners.items():
        seconds = train(maml, tasks, iterations)
        curve = maml.adaptation_curve(test, steps=10, lr=0.01)["loss"].mean(0)
        adapted = sum(maml.params()[n].numel() for n in maml.adapted_names)
        total = sum(p.numel() for p in maml.model.parameters())
        print(
            f"{name}: adapts {adapted} of {total} parameters ({', '.join(maml.adapted_names)}); "
            f"{1000 * seconds:.1f} ms per meta-iteration"
        )
        print(f"{name}: query MSE {curve[0].item():.4f} before adaptation, {curve[-1].item():.4f} after 10 steps")
        print(f"RESULT {name} before={curve[0].item():.6f} after={curve[-1].item():.6f}")


if __name__ == "__main__":
    main()
