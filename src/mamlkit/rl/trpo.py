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

from ..engine import MAML
from ..engine.functional import Params
from .policy import kl, log_prob, masked_mean


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


@dataclass
class TaskData:
    """One task's samples for a meta-update: the pre-update batch the inner step adapts on
    (``None`` without inner steps) and the post-update batch with its sampling distribution."""

    pre_obs: Tensor | None
    pre_targets: tuple[Tensor, Tensor, Tensor] | None
    obs: Tensor
    actions: Tensor
    advantages: Tensor
    mask: Tensor
    old_mean: Tensor
    old_log_std: Tensor


class MetaTRPO:
    """One TRPO step on ``maml``'s meta-parameters per call of ``step``; the inner step (size,
    count, order) is the learner's own."""

    def __init__(
        self,
        maml: MAML,
        *,
        max_kl: float = 0.01,
        cg_iters: int = 10,
        cg_damping: float = 1e-5,
        backtrack_ratio: float = 0.8,
        max_backtracks: int = 15,
    ):
        self.maml = maml
        self.max_kl, self.cg_iters, self.cg_damping = max_kl, cg_iters, cg_damping
        self.backtrack_ratio, self.max_backtracks = backtrack_ratio, max_backtracks

    def adapt(self, data: TaskData, params: Params, create_graph: bool) -> Params:
        if not self.maml.inner_steps:
            return params
        return self.maml.adapt(data.pre_obs, data.pre_targets, params=params, create_graph=create_graph)

    def policy_outputs(self, tasks: list[TaskData], params: Params, create_graph: bool) -> list[tuple[Tensor, Tensor]]:
        """Each task's post-update policy ``(mean, log_std)`` on its post-update observations,
        as a function of the meta-parameters ``params`` (through the inner step)."""
        return [self.maml(d.obs, self.adapt(d, params, create_graph)) for d in tasks]

    def objectives(self, tasks: list[TaskData], params: Params, create_graph: bool) -> tuple[Tensor, Tensor]:
        """Mean surrogate and mean KL over tasks, as functions of the meta-parameters ``params``."""
        return self.surrogate_and_kl(tasks, self.policy_outputs(tasks, params, create_graph))

    @staticmethod
    def surrogate_and_kl(tasks: list[TaskData], outputs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Mean surrogate and mean KL over tasks from the tasks' policy outputs."""
        surr, kls = [], []
        for d, (mean, log_std) in zip(tasks, outputs):
            old_logp = log_prob(d.old_mean, d.old_log_std, d.actions)
            ratio = torch.exp(log_prob(mean, log_std, d.actions) - old_logp)
            surr.append(masked_mean(ratio * d.advantages, d.mask))
            kls.append(masked_mean(kl((d.old_mean, d.old_log_std), (mean, log_std)), d.mask))
        return torch.stack(surr).mean(), torch.stack(kls).mean()

    def kl_hvp(
        self,
        tasks: list[TaskData],
        params: Params,
        create_graph: bool,
        outputs: list[tuple[Tensor, Tensor]] | None = None,
    ) -> Callable[[Tensor], Tensor]:
        """``v -> (H + damping) v`` with ``H`` the Hessian of the mean KL w.r.t. the meta-parameters.

        At the current parameters the new policy equals the old one, so the KL's gradient
        w.r.t. the policy outputs is zero and its Hessian is exactly ``J^T M J``: ``J`` the
        Jacobian of the outputs (mean, log-std) through the inner update, ``M`` the Gaussian
        Fisher (1/sigma² for the mean, 2 for the log-std). Two backward passes per product
        instead of differentiating the KL three times: faster, and equal to rounding
        (BENCHMARKS.md, "Measurements behind design choices").

        ``outputs``: ``policy_outputs(tasks, params, create_graph)`` whose graph is still alive
        (``step`` passes the surrogate's, so the inner updates are built once per meta-update);
        by default they are computed anew.
        """
        leaves = list(params.values())
        if outputs is None:
            outputs = self.policy_outputs(tasks, params, create_graph)
        flat, weights = [], []
        for d, (mean, log_std) in zip(tasks, outputs):
            w = d.mask[..., None] / d.mask.sum().clamp_min(1) / len(tasks)
            flat += [mean, log_std]
            weights += [w * torch.exp(-2 * d.old_log_std), 2 * w]
        # J^T u as a (linear) function of dummy cotangents u; differentiating it w.r.t. u gives J v.
        dummies = [torch.zeros_like(o, requires_grad=True) for o in flat]
        jt = torch.autograd.grad(flat, leaves, dummies, create_graph=True)

        def hvp(v: Tensor) -> Tensor:
            vs = [x.view_as(p) for x, p in zip(torch.split(v, [p.numel() for p in leaves]), leaves)]
            jv = torch.autograd.grad(jt, dummies, vs, retain_graph=True)
            hv = torch.autograd.grad(flat, leaves, [w * j for w, j in zip(weights, jv)], retain_graph=True)
            return parameters_to_vector(hv) + self.cg_damping * v

        return hvp

    def step(self, tasks: list[TaskData]) -> dict[str, float]:
        """Natural gradient direction by conjugate gradient, scaled to the KL bound, then a
        backtracking line search that needs a better surrogate and a KL within the bound."""
        params = self.maml.params()
        leaves = list(params.values())
        create_graph = not self.maml.first_order
        # One graph through the inner updates serves the meta-gradient and every KL product.
        outputs = self.policy_outputs(tasks, params, create_graph)
        surr, _ = self.surrogate_and_kl(tasks, outputs)
        g = parameters_to_vector(torch.autograd.grad(surr, leaves, retain_graph=True))
        hvp = self.kl_hvp(tasks, params, create_graph, outputs)
        direction, h_direction = conjugate_gradient_with_product(hvp, g, self.cg_iters)
        shs = direction @ h_direction
        full_step = math.sqrt(2 * self.max_kl / (shs.item() + 1e-8)) * direction
        stats = {"surrogate": surr.item(), "grad_norm": g.norm().item()}
        del hvp, outputs  # free the graph before the line search
        return {**stats, **self.line_search(tasks, full_step, surr.item())}

    @torch.no_grad()
    def line_search(self, tasks: list[TaskData], full_step: Tensor, surr_before: float) -> dict[str, float]:
        """Try ``backtrack_ratio**k * full_step`` for k = 0, 1, ...; keep the first step with a
        better surrogate and a KL within the bound, else restore the parameters (rllab)."""
        leaves = list(self.maml.params().values())
        old = parameters_to_vector(leaves).detach()
        for k in range(self.max_backtracks):
            vector_to_parameters(old + self.backtrack_ratio**k * full_step, leaves)
            new_surr, new_kl = self.objectives(tasks, self.maml.params(), create_graph=False)
            if torch.isfinite(new_surr) and new_surr.item() > surr_before and new_kl.item() <= self.max_kl:
                return {"kl": new_kl.item(), "improvement": new_surr.item() - surr_before, "backtracks": k}
        vector_to_parameters(old, leaves)
        return {"kl": 0.0, "improvement": 0.0, "backtracks": self.max_backtracks}
