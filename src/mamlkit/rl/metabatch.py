"""RL's meta-batch: trajectories before and after each task's inner policy-gradient step, the
data TRPO needs, the returns after 0..n steps at test, and TRPO as the training loop's update.

A task family (``mamlkit.rl.tasks``) samples tasks and rolls policies out on them;
``advantages`` is ``episodes -> [tasks, trajectories, time]`` (``advantage_fn``). Every
function takes what it uses explicitly, so tests and benchmarks call these very functions.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import distributed
from ..engine import MAML
from ..engine.functional import Params, detach
from ..engine.strategies import map_tasks
from .policy import TaskPolicy
from .sampler import Episodes, advantages
from .tasks import rollout_seeds
from .trpo import MetaTRPO, TaskData, task_strategy

AdvantageFn = Callable[[Episodes], Tensor]


def advantage_fn(gamma: float, gae_lambda: float, center: bool, baseline_reg: float) -> AdvantageFn:
    """Per-task advantages with the linear feature baseline (``mamlkit.rl.sampler.advantages``)."""
    return functools.partial(advantages, gamma=gamma, lam=gae_lambda, center=center, reg=baseline_reg)


def _stack(params: list[Params]) -> Params:
    return {k: torch.stack([p[k] for p in params]) for k in params[0]}


def _unstack(params: Params, n: int) -> list[Params]:
    return [{k: v[i] for k, v in params.items()} for i in range(n)]


def _adapt(
    learner: MAML, obs: Tensor, targets: tuple, params: Params | list[Params], lr=None, steps: int | None = None
) -> list[Params]:
    """Every task's inner step(s) on its own episodes, computed together (``vmap`` over tasks);
    ``params`` shared by all tasks or one set per task. Detached: for sampling, not for TRPO."""
    shared = isinstance(params, dict)
    strategy = task_strategy(learner.model, "auto", second_order=False)

    def one_task(p, o, t):
        return learner.adapt(o, t, steps=steps, lr=lr, params=p)

    with torch.no_grad():
        out = map_tasks(
            one_task,
            (None if shared else 0, 0, 0),
            params if shared else _stack(params),
            obs,
            targets,
            strategy=strategy,
        )
    return _unstack(detach(out), obs.shape[0])


def adapt_tasks(
    learner: MAML, episodes: Episodes, adv: AdvantageFn, params: list[Params], lr: float, steps: int = 1
) -> list[Params]:
    """Each task's parameters after ``steps`` REINFORCE steps of size ``lr`` on its own episodes
    (task ``i`` starts from ``params[i]``); detached, for sampling."""
    return _adapt(learner, episodes.obs, (episodes.actions, adv(episodes), episodes.mask), params, lr, steps)


def sample_meta_batch(
    learner: MAML, family, tasks: Tensor, trajectories: int, adv: AdvantageFn, seeds: Tensor
) -> tuple[TaskData, dict[str, float]]:
    """Sample a meta-batch for TRPO: ``trajectories`` episodes per task with the meta-parameters,
    the learner's inner step on each task, then as many with the adapted parameters (only the
    latter without inner steps); ``seeds [2, tasks]``: each task's seeds of the two rollouts.
    Returns the ``TaskData`` of all tasks and the mean returns."""
    theta = detach(learner.params())
    info = {}
    pre, targets = None, None
    if learner.inner_steps:
        pre = family.rollout(learner.fmodel, theta, tasks, trajectories, seeds[0])
        targets = (pre.actions, adv(pre), pre.mask)
        adapted = _adapt(learner, pre.obs, targets, theta)
        info["return_pre"] = pre.returns().mean().item()
    else:
        adapted = [theta] * len(tasks)
    post = family.rollout(learner.fmodel, adapted, tasks, trajectories, seeds[1])
    with torch.no_grad():
        old_mean, old_log_std = TaskPolicy(learner.fmodel, adapted)(post.obs)
    info["return_post" if pre is not None else "return"] = post.returns().mean().item()
    data = TaskData(
        pre_obs=pre.obs if pre is not None else None,
        pre_targets=targets,
        obs=post.obs,
        actions=post.actions,
        advantages=adv(post),
        mask=post.mask,
        old_mean=old_mean,
        old_log_std=old_log_std,
    )
    return data, info


def adaptation_returns(
    learner: MAML,
    family,
    tasks: Tensor,
    trajectories: int,
    steps: int,
    lrs: Sequence[float],
    adv: AdvantageFn,
    generator: torch.Generator,
) -> Tensor:
    """Mean return per task ``[tasks, steps + 1]`` after 0..``steps`` REINFORCE steps, each on
    ``trajectories`` fresh episodes of the current policy (step sizes ``lrs``, the last repeating)."""
    params: list[Params] = [detach(learner.params())] * len(tasks)
    out = []
    for s in range(steps + 1):
        ep = family.rollout(learner.fmodel, params, tasks, trajectories, rollout_seeds(len(tasks), generator))
        out.append(ep.returns().mean(1))
        if s == steps:
            break
        params = adapt_tasks(learner, ep, adv, params, lrs[min(s, len(lrs) - 1)])
    return torch.stack(out, 1)


def tune_inner_lrs(
    learner: MAML,
    family,
    tasks: Tensor,
    trajectories: int,
    steps: int,
    candidates: Sequence[float],
    adv: AdvantageFn,
    generator: torch.Generator,
) -> tuple[list[float], list[list[float]]]:
    """Step sizes chosen among ``candidates`` on (validation) ``tasks``, greedily: step s takes the
    candidate whose adapted policies return most, given the sizes already chosen. At each step
    every candidate's episodes use the same seeds (initial states and action noise), so the
    candidates differ only by their step size. Returns ``(sizes, mean return of every candidate
    at every step)``."""
    params: list[Params] = [detach(learner.params())] * len(tasks)
    ep = family.rollout(learner.fmodel, params, tasks, trajectories, rollout_seeds(len(tasks), generator))
    chosen, table = [], []
    for _ in range(steps):
        trials = []
        seeds = rollout_seeds(len(tasks), generator)
        for lr in candidates:
            adapted = adapt_tasks(learner, ep, adv, params, lr)
            trial_ep = family.rollout(learner.fmodel, adapted, tasks, trajectories, seeds)
            trials.append((trial_ep.returns().mean().item(), lr, adapted, trial_ep))
        table.append([t[0] for t in trials])
        _, lr, params, ep = max(trials, key=lambda t: t[0])
        chosen.append(lr)
    return chosen, table


class MetaTRPOUpdate:
    """The training loop's outer step for RL: sample ``meta_batch_size`` tasks and their
    meta-batch, then one ``MetaTRPO`` step. TRPO keeps no state between steps.

    Under torchrun every process draws the same tasks and seeds from the shared generator and
    samples its share of the tasks; TRPO then sums the shares, and the logged returns are the
    whole meta-batch's."""

    def __init__(
        self,
        trpo: MetaTRPO,
        family,
        meta_batch_size: int,
        trajectories: int,
        adv: AdvantageFn,
        device: str | torch.device = "cpu",
    ):
        self.trpo, self.family, self.adv, self.device = trpo, family, adv, device
        self.meta_batch_size, self.trajectories = meta_batch_size, trajectories

    def step(self, generator: torch.Generator) -> dict[str, float]:
        t0 = time.perf_counter()
        n = self.meta_batch_size
        tasks = self.family.sample(n, generator).to(self.device)
        seeds = torch.stack([rollout_seeds(n, generator), rollout_seeds(n, generator)])
        part = distributed.shard(n)
        data, info = sample_meta_batch(
            self.trpo.maml, self.family, tasks[part], self.trajectories, self.adv, seeds[:, part]
        )
        if distributed.active():  # the whole meta-batch's mean returns, weighted by task counts
            values = torch.tensor(list(info.values()), dtype=torch.float64) * ((part.stop - part.start) / n)
            distributed.all_reduce_sum_([values])
            info = dict(zip(info, values.tolist()))
        t1 = time.perf_counter()
        stats = self.trpo.step(data)
        return {**info, **stats, "sample_s": t1 - t0, "update_s": time.perf_counter() - t1}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
