"""A reinforcement-learning task family of your own, meta-trained with MAML and TRPO.

Shows: what an RL task family is to mamlkit: ``sample(n, generator)`` (a tensor of task
parameters) and ``rollout(fmodel, params, tasks, trajectories, seeds)`` (padded ``Episodes``),
here a point on a line that must walk to a goal it does not observe (rewarded by minus its
distance). The environment is a small batched class (``reset``, ``step``) that
``mamlkit.rl.sampler.rollout`` steps for every task and trajectory at once. Then the pieces of
``mamlkit.rl`` do the rest: the Gaussian policy inside ``MAML`` with the REINFORCE inner loss,
``MetaTRPOUpdate`` (sample a meta-batch, one TRPO step through the inner step), and
``adaptation_returns`` (returns after 0..n policy-gradient steps on new tasks).

Needs the rl extra: ``pip install "mamlkit[rl]"``.

    python examples/custom_rl_task.py            # ~2 minutes on a CPU
    python examples/custom_rl_task.py --quick    # a few seconds
"""

import argparse

import torch
from torch import Tensor

from mamlkit import MAML
from mamlkit.rl.metabatch import MetaTRPOUpdate, adaptation_returns, advantage_fn
from mamlkit.rl.policy import GaussianMLPPolicy, TaskPolicy, reinforce_loss
from mamlkit.rl.sampler import Episodes, rollout, task_noise
from mamlkit.rl.trpo import MetaTRPO


class LineWalk:
    """``tasks x trajectories`` points on a line, stepped together in torch: each moves by its
    action (clipped to [-1, 1], times 0.1) and is rewarded by minus its distance to its goal."""

    def __init__(self, goals: Tensor, trajectories: int):
        self.goals = goals[:, None, :].expand(-1, trajectories, -1)  # [tasks, trajectories, 1]

    def reset(self) -> Tensor:
        self.position = torch.zeros_like(self.goals)
        return self.position  # the observation: the position only, never the goal

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self.position = self.position + 0.1 * action.clamp(-1, 1)
        distance = (self.position - self.goals).abs().squeeze(-1)
        return self.position, -distance, distance < 0.01  # observation, reward, done


class LineTasks:
    """The task family: goals uniform on [-1, 1], episodes of ``horizon`` steps."""

    obs_dim, act_dim = 1, 1

    def __init__(self, horizon: int = 20):
        self.horizon = horizon

    def sample(self, n: int, g: torch.Generator) -> Tensor:
        return 2 * torch.rand(n, 1, generator=g) - 1  # [n, 1] goals

    def rollout(self, fmodel, params, tasks: Tensor, trajectories: int, seeds: Tensor) -> Episodes:
        # Each task's action noise from its own seed: a task's episodes do not depend on the others'.
        noise = task_noise(seeds, (trajectories, self.horizon, self.act_dim))
        return rollout(TaskPolicy(fmodel, params), LineWalk(tasks, trajectories), noise)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: a few iterations, few tasks")
    args = parser.parse_args()
    iterations, tasks_per_batch, trajectories = (3, 10, 10) if args.quick else (100, 20, 20)
    torch.manual_seed(0)

    family = LineTasks()
    policy = GaussianMLPPolicy(family.obs_dim, family.act_dim, hidden=(32, 32))
    learner = MAML(policy, reinforce_loss, inner_lr=0.1, inner_steps=1)  # the inner step: one REINFORCE step
    adv = advantage_fn(gamma=0.99, gae_lambda=1.0, center=True, baseline_reg=1e-5)  # linear feature baseline
    update = MetaTRPOUpdate(MetaTRPO(learner, max_kl=0.01), family, tasks_per_batch, trajectories, adv)

    g = torch.Generator().manual_seed(0)
    test_tasks = family.sample(40, torch.Generator().manual_seed(1))

    def returns() -> list[float]:  # mean return on the test tasks after 0, 1 and 2 inner steps
        curve = adaptation_returns(
            learner, family, test_tasks, trajectories, 2, [0.1], adv, torch.Generator().manual_seed(2)
        )
        return curve.mean(0).tolist()

    untrained = returns()
    for it in range(1, iterations + 1):
        info = update.step(g)
        print(f"iteration {it}: return {info['return_pre']:.2f} before the inner step, {info['return_post']:.2f} after")
    trained = returns()
    show = lambda r: ", ".join(f"{v:.2f}" for v in r)  # noqa: E731
    print(f"test returns after 0, 1, 2 steps: untrained {show(untrained)}; meta-trained {show(trained)}")
    print(f"RESULT before={trained[0]:.4f} after={trained[1]:.4f}")


if __name__ == "__main__":
    main()
