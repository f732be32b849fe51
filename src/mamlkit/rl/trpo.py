"""TRPO meta-update through MAML's inner step (the paper's RL meta-optimiser).

The objective is the importance-weighted surrogate of the post-update trajectories,
``mean_i mean_t pi_{theta'_i(theta)}(a|s) / pi_old_i(a|s) * A'``, with ``theta'_i`` the
adapted parameters as a function of the meta-parameters. The trust region bounds the mean
``KL(pi_old_i || pi_{theta'_i(theta)})``. With ``inner_steps = 0`` it is plain TRPO (the
pretrained and oracle baselines).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from .. import distributed
from ..engine import MAML, NonFinite
from ..engine.functional import Params
from ..engine.strategies import candidate_strategies, map_tasks, refuse_vmap_for_ops, vmap_unsafe_ops
from .policy import kl, log_prob


def conjugate_gradient(hvp: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10, tol: float = 1e-10) -> Tensor:
    """Approximately solve ``H x = b`` for symmetric positive-definite ``H`` given ``x -> H x``."""
    return conjugate_gradient_with_product(hvp, b, iters, tol)[0]


def conjugate_gradient_with_product(
    hvp: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10, tol: float = 1e-10
) -> tuple[Tensor, Tensor]:
    """``conjugate_gradient``'s ``x`` and also ``H x``, accumulated from the products CG already
    made (``x = sum_k alpha_k p_k``, so ``H x = sum_k alpha_k H p_k``): TRPO's step size needs
    ``x^T H x``, which would otherwise cost one more product through the inner update."""
    x = torch.zeros_like(b)
    hx = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iters):
        hp = hvp(p)
        alpha = rr / (p @ hp)
        x += alpha * p
        hx += alpha * hp
        r -= alpha * hp
        rr_new = r @ r
        if rr_new < tol:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, hx


def task_strategy(model: torch.nn.Module, strategy: str = "auto", second_order: bool = True) -> str:
    """How RL computes its tasks' inner steps: ``strategy`` itself when ``loop`` or ``vmap``;
    for ``auto`` the loop on a CPU (measured faster there for the policy's second-order
    products) and vmap elsewhere, never vmap where it would be inexact."""
    candidates = candidate_strategies(strategy, model, second_order)
    on_cpu = next(model.parameters()).device.type == "cpu"
    return "loop" if on_cpu and "loop" in candidates else candidates[0]


def _total_tasks(local: int, device) -> int:
    """The meta-batch's task count: this process's, summed over processes under torchrun."""
    if not distributed.active():
        return local
    n = torch.tensor([float(local)], device=device)
    distributed.all_reduce_sum_([n])
    return int(n.item())


def valid_steps(obs: Tensor, targets: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """One task's episodes ``[trajs, time, ...]`` with ``targets = (actions, advantages, mask)``,
    reduced to their valid steps ``[steps, ...]`` (mask all ones): the same masked-mean loss
    without computing the policy on the steps after an episode ended."""
    actions, advantages, mask = targets
    if bool(mask.all()):
        return obs, targets
    idx = mask.bool()
    return obs[idx], (actions[idx], advantages[idx], mask[idx])


def on_valid_steps(
    policy: Callable[[Tensor], tuple[Tensor, Tensor]], obs: Tensor, mask: Tensor, old: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """``policy(obs)`` computed on the valid steps only; the steps after an episode ended take the
    old policy's outputs ``old``, so that they add nothing to the surrogate, the KL or a gradient.
    Terminating episodes (the ant's) leave about a third of a batch padded, a third of the work."""
    if bool(mask.all()):
        return policy(obs)
    idx = mask.bool()
    outs = policy(obs[idx])
    return tuple(o_old.detach().index_put((idx,), o) for o_old, o in zip(old, outs))


@dataclass
class TaskData:
    """A meta-batch for TRPO, every tensor with a leading task dimension ``[tasks, trajs, time, ...]``:
    the pre-update episodes the inner step adapts on (``None`` without inner steps; targets are
    ``(actions, advantages, mask)``) and the post-update episodes with the policy that sampled them."""

    pre_obs: Tensor | None
    pre_targets: tuple[Tensor, Tensor, Tensor] | None
    obs: Tensor
    actions: Tensor
    advantages: Tensor
    mask: Tensor
    old_mean: Tensor
    old_log_std: Tensor

    def __len__(self) -> int:
        return self.obs.shape[0]


class MetaTRPO:
    """One TRPO step on ``maml``'s meta-parameters per call of ``step``; the inner step (size,
    count, order) is the learner's own.

    The surrogate, KL and Fisher weights are batched tensor maths over all tasks. Each task's
    inner step and policy outputs run under ``torch.func.vmap`` or in a loop (``strategy``);
    ``"auto"`` takes the loop on a CPU, where the second-order products through vmap's batched
    kernels measured slower, and vmap elsewhere (BENCHMARKS.md, "Half-cheetah meta-iteration");
    never vmap where the policy holds layers whose second-order gradients vmap gets wrong.
    """

    def __init__(
        self,
        maml: MAML,
        *,
        max_kl: float = 0.01,
        cg_iters: int = 10,
        cg_damping: float = 1e-5,
        backtrack_ratio: float = 0.8,
        max_backtracks: int = 15,
        strategy: str = "auto",
    ):
        self.maml = maml
        self.max_kl, self.cg_iters, self.cg_damping = max_kl, cg_iters, cg_damping
        self.backtrack_ratio, self.max_backtracks = backtrack_ratio, max_backtracks
        self._second_order = maml.inner_steps > 0 and not maml.first_order
        self.strategy = task_strategy(maml.model, strategy, second_order=self._second_order)
        self._requested, self._ops_checked = strategy, not (self._second_order and self.strategy == "vmap")
        self._engine_checked = False

    def policy_outputs(self, data: TaskData, params: Params, create_graph: bool) -> tuple[Tensor, Tensor]:
        """The post-update policy ``(mean, log_std)`` of every task on its post-update observations
        (``[tasks, trajs, time, a]``), as a function of the meta-parameters ``params`` through
        each task's inner step."""
        old = (data.old_mean, data.old_log_std)
        if not self.maml.inner_steps:
            return on_valid_steps(lambda obs: self.maml(obs, params), data.obs, data.mask, old)
        if not self._ops_checked:  # vmap's second order is wrong through fused normalisation ops
            self._ops_checked = True
            unsafe = vmap_unsafe_ops(lambda: self.maml(data.pre_obs[0], params))
            if unsafe and self._requested == "vmap":
                refuse_vmap_for_ops(unsafe)
            if unsafe:
                self.strategy = "loop"

        if self.strategy == "vmap":  # one shape for all tasks: padded episodes
            if not self._engine_checked:  # what adapt checks on its first call, which vmap's transform hides
                self._engine_checked = True
                first = torch.utils._pytree.tree_map(lambda t: t[0], (data.pre_obs, data.pre_targets))
                ops = self.maml._model_ops(params, *first)
                self.maml._check_ops(ops, self._second_order)

            def one_task(pre_obs, pre_targets, obs):
                adapted = self.maml.adapt(pre_obs, pre_targets, params=params, create_graph=create_graph)
                return self.maml(obs, adapted)

            return map_tasks(one_task, (0, 0, 0), data.pre_obs, data.pre_targets, data.obs, strategy="vmap")

        def one_task_valid(pre_obs, pre_targets, obs, mask, old):
            pre_obs, pre_targets = valid_steps(pre_obs, pre_targets)
            adapted = self.maml.adapt(pre_obs, pre_targets, params=params, create_graph=create_graph)
            return on_valid_steps(lambda o: self.maml(o, adapted), obs, mask, old)

        args = (data.pre_obs, data.pre_targets, data.obs, data.mask, old)
        return map_tasks(one_task_valid, (0,) * 5, *args, strategy="loop")

    def objectives(
        self, data: TaskData, params: Params, create_graph: bool, total: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Mean surrogate and mean KL over tasks, as functions of the meta-parameters ``params``."""
        return self.surrogate_and_kl(data, self.policy_outputs(data, params, create_graph), total)

    @staticmethod
    def surrogate_and_kl(
        data: TaskData, outputs: tuple[Tensor, Tensor], total: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Each task's surrogate and KL (means over its valid steps), summed over ``data``'s tasks
        and divided by ``total``: the mean over tasks by default, this process's share of the
        whole meta-batch's mean under torchrun."""
        mean, log_std = outputs
        old_logp = log_prob(data.old_mean, data.old_log_std, data.actions)
        ratio = torch.exp(log_prob(mean, log_std, data.actions) - old_logp)
        steps = data.mask.sum((1, 2)).clamp_min(1)
        surr = (ratio * data.advantages * data.mask).sum((1, 2)) / steps
        kls = (kl((data.old_mean, data.old_log_std), (mean, log_std)) * data.mask).sum((1, 2)) / steps
        total = total or len(data)
        return surr.sum() / total, kls.sum() / total

    def kl_hvp(
        self,
        data: TaskData,
        params: Params,
        create_graph: bool,
        outputs: tuple[Tensor, Tensor] | None = None,
        total: int | None = None,
    ) -> Callable[[Tensor], Tensor]:
        """``v -> (H + damping) v`` with ``H`` the Hessian of the mean KL w.r.t. the meta-parameters.

        At the current parameters the new policy equals the old one, so the KL's gradient
        w.r.t. the policy outputs is zero and its Hessian is exactly ``J^T M J``: ``J`` the
        Jacobian of the outputs (mean, log-std) through the inner update, ``M`` the Gaussian
        Fisher (1/sigma² for the mean, 2 for the log-std). Two backward passes per product
        instead of differentiating the KL three times: faster, and equal to rounding
        (BENCHMARKS.md, "Measurements behind design choices").

        ``outputs``: ``policy_outputs(data, params, create_graph)`` whose graph is still alive
        (``step`` passes the surrogate's, so the inner updates are built once per meta-update);
        by default they are computed anew. ``total``: the meta-batch's task count when ``data``
        is this process's share of it (torchrun); the products are then summed over processes.
        """
        leaves = list(params.values())
        if outputs is None:
            outputs = self.policy_outputs(data, params, create_graph)
        mean, log_std = outputs
        steps = data.mask.sum((1, 2), keepdim=True).clamp_min(1)
        w = (data.mask / steps / (total or len(data)))[..., None]
        flat = [mean, log_std]
        weights = [w * torch.exp(-2 * data.old_log_std), 2 * w]
        # J^T u as a (linear) function of dummy cotangents u; differentiating it w.r.t. u gives J v.
        dummies = [torch.zeros_like(o, requires_grad=True) for o in flat]
        jt = torch.autograd.grad(flat, leaves, dummies, create_graph=True)

        def hvp(v: Tensor) -> Tensor:
            vs = [x.view_as(p) for x, p in zip(torch.split(v, [p.numel() for p in leaves]), leaves)]
            jv = torch.autograd.grad(jt, dummies, vs, retain_graph=True)
            hv = parameters_to_vector(
                torch.autograd.grad(flat, leaves, [w * j for w, j in zip(weights, jv)], retain_graph=True)
            )
            distributed.all_reduce_sum_([hv])
            return hv + self.cg_damping * v

        return hvp

    def step(self, data: TaskData) -> dict[str, float]:
        """Natural gradient direction by conjugate gradient, scaled to the KL bound, then a
        backtracking line search that needs a better surrogate and a KL within the bound.

        Under torchrun ``data`` is this process's share of the meta-batch: the surrogate, its
        gradient, every KL product and the line search's values are summed over processes, so
        every process takes the same step."""
        params = self.maml.params()
        leaves = list(params.values())
        create_graph = not self.maml.first_order
        total = _total_tasks(len(data), data.obs.device)
        # One graph through the inner updates serves the meta-gradient and every KL product.
        outputs = self.policy_outputs(data, params, create_graph)
        surr, _ = self.surrogate_and_kl(data, outputs, total)
        g = parameters_to_vector(torch.autograd.grad(surr, leaves, retain_graph=True))
        surr = surr.detach().reshape(1)
        distributed.all_reduce_sum_([g, surr])
        if not torch.isfinite(surr).all() or not torch.isfinite(g).all():
            raise NonFinite("surrogate" if not torch.isfinite(surr).all() else "surrogate's gradient")
        hvp = self.kl_hvp(data, params, create_graph, outputs, total)
        direction, h_direction = conjugate_gradient_with_product(hvp, g, self.cg_iters)
        shs = direction @ h_direction
        full_step = math.sqrt(2 * self.max_kl / (shs.item() + 1e-8)) * direction
        stats = {"surrogate": surr.item(), "grad_norm": g.norm().item()}
        del hvp, outputs  # free the graph before the line search
        return {**stats, **self.line_search(data, full_step, surr.item(), total)}

    @torch.no_grad()
    def line_search(
        self, data: TaskData, full_step: Tensor, surr_before: float, total: int | None = None
    ) -> dict[str, float]:
        """Try ``backtrack_ratio**k * full_step`` for k = 0, 1, ...; keep the first step with a
        better surrogate and a KL within the bound, else restore the parameters (rllab)."""
        leaves = list(self.maml.params().values())
        old = parameters_to_vector(leaves).detach()
        for k in range(self.max_backtracks):
            vector_to_parameters(old + self.backtrack_ratio**k * full_step, leaves)
            values = torch.stack(self.objectives(data, self.maml.params(), False, total))
            distributed.all_reduce_sum_([values])
            new_surr, new_kl = values
            if torch.isfinite(new_surr) and new_surr.item() > surr_before and new_kl.item() <= self.max_kl:
                return {"kl": new_kl.item(), "improvement": new_surr.item() - surr_before, "backtracks": k}
        vector_to_parameters(old, leaves)
        return {"kl": 0.0, "improvement": 0.0, "backtracks": self.max_backtracks}
