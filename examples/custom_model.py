"""Your own model and your own tasks with MAML.

Shows: a task family written inline (lines y = a*x + b, each task a new slope and intercept), a
plain ``nn.Module``, the meta-training loop (``MAML.meta_loss`` + any optimiser), then test-time
adaptation on new tasks: ``adaptation_curve`` for the query loss after 0..n steps, and ``adapt``
plus a forward pass with the adapted parameters for one task.

    python examples/custom_model.py            # ~15 seconds on a CPU
    python examples/custom_model.py --quick    # a few seconds
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from mamlkit import MAML, TaskBatch


def line_tasks(n_tasks: int, k_support: int, k_query: int, g: torch.Generator) -> TaskBatch:
    """``n_tasks`` regression tasks y = a*x + b (+ noise); every field has a leading task dimension."""
    a = torch.empty(n_tasks, 1, 1).uniform_(-2, 2, generator=g)
    b = torch.empty(n_tasks, 1, 1).uniform_(-1, 1, generator=g)
    x = torch.empty(n_tasks, k_support + k_query, 1).uniform_(-3, 3, generator=g)
    y = a * x + b + 0.05 * torch.randn(x.shape, generator=g)
    return TaskBatch(x[:, :k_support], y[:, :k_support], x[:, k_support:], y[:, k_support:])


class TinyNet(nn.Module):
    """Any module works: MAML calls it through torch.func.functional_call with adapted weights."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: fewer iterations and test tasks")
    args = parser.parse_args()
    iterations, test_tasks = (50, 100) if args.quick else (5000, 1000)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    maml = MAML(TinyNet(), F.mse_loss, inner_lr=0.02, inner_steps=1)  # any loss(outputs, targets)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    for it in range(1, iterations + 1):
        loss = maml.meta_loss(line_tasks(16, 5, 10, g))  # query loss after one inner step on each support set
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % max(iterations // 5, 1) == 0:
            print(f"iteration {it}: meta-loss {loss.item():.4f}")

    # New tasks: query MSE after 0..5 steps of size 0.02 on 5 support points each.
    curve = maml.adaptation_curve(line_tasks(test_tasks, 5, 20, g), steps=5, lr=0.02)["loss"].mean(0)
    print("query MSE after 0..5 steps:", " ".join(f"{v:.4f}" for v in curve.tolist()))

    # One task by hand: adapt returns new parameters (the model is untouched), the forward takes them.
    task = line_tasks(1, 5, 20, g)
    fast = maml.adapt(task.support_inputs[0], task.support_targets[0], steps=5, lr=0.02)
    before = F.mse_loss(maml(task.query_inputs[0]), task.query_targets[0]).item()
    after = F.mse_loss(maml(task.query_inputs[0], fast), task.query_targets[0]).item()
    print(f"one new task: query MSE {before:.4f} before adaptation, {after:.4f} after 5 steps")
    print(f"RESULT before={curve[0].item():.6f} after={curve[-1].item():.6f}")


if __name__ == "__main__":
    main()
