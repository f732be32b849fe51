"""MAML++'s training options (Antoniou, Edwards and Storkey, "How to train your MAML", ICLR 2019):
the multi-step loss schedule, the cosine schedule of the outer step size, and the checks of
which option combinations the engine computes. Each is off by default.

The schedules are functions of the meta-iteration alone, so a resumed run reproduces them.
"""

from __future__ import annotations

import math
from numbers import Integral

NORMS = ("transductive", "inductive", "per_step")
LR_SCHEDULES = ("constant", "cosine")

# MAML++'s floor on each non-final step's weight, as a share of a uniform weight (0.03 / N).
MSL_FLOOR = 0.03


def msl_weights(steps: int, iteration: int, annealing: int) -> list[float] | None:
    """The weights of the query losses after inner steps 1..``steps`` at ``iteration`` (0-based),
    or ``None`` where the meta-loss is the final step's query loss alone.

    With N = ``steps`` and A = ``annealing``: at iteration i < A, every non-final weight is
    ``max(1/N - i/(N·A), 0.03/N)`` and the final one ``min(1/N + i·(N-1)/(N·A), 1 - (N-1)·0.03/N)``;
    they start uniform, sum to 1 throughout (the floor and the cap are reached together, at
    i = 0.97·A), and from i = A on only the final step's loss counts (MAML++'s code stops the
    multi-step loss there). ``annealing=0``: uniform weights at every iteration. MAML++ counts
    A in epochs of 500 iterations and moves the weights once an epoch; here they move every
    iteration, on the same line.
    """
    if steps < 1:
        raise ValueError("the multi-step loss needs inner_steps >= 1")
    if annealing and iteration >= annealing:
        return None
    n = steps
    uniform = 1.0 / n
    if not annealing:
        return [uniform] * n
    decay = uniform / annealing
    floor = MSL_FLOOR / n
    weights = [max(uniform - iteration * decay, floor) for _ in range(n - 1)]
    weights.append(min(uniform + iteration * (n - 1) * decay, 1.0 - (n - 1) * floor))
    return weights


def cosine_lr(base: float, low: float, iteration: int, iterations: int) -> float:
    """The outer step size at ``iteration`` (0-based) of ``iterations`` under cosine annealing from
    ``base`` to ``low``: ``low + (base - low)·(1 + cos(π·i/T))/2`` (``torch.optim``'s
    CosineAnnealingLR in closed form; MAML++ steps it once an epoch, here it moves every iteration)."""
    if iterations <= 0:
        return base
    t = min(max(iteration, 0), iterations) / iterations
    return low + (base - low) * (1.0 + math.cos(math.pi * t)) / 2.0


def check_options(
    *,
    inner_steps: int = 1,
    first_order: bool = False,
    learn_inner_lr: bool = False,
    strategy: str = "auto",
    compile: bool = False,
    multi_step_loss: bool = False,
    msl_iterations: int = 0,
    lslr: bool = False,
    first_order_iterations: int = 0,
    norm: str = "transductive",
) -> None:
    """Refuse, with one sentence naming the fix, a combination of MAML++'s options that the engine
    cannot compute (``MAML`` calls this at construction, the configs when they are built)."""
    for name, value in (("msl_iterations", msl_iterations), ("first_order_iterations", first_order_iterations)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if lslr and learn_inner_lr:
        raise ValueError(
            "lslr=True (one learned step size per adapted tensor and inner step) and learn_inner_lr=True "
            "(Meta-SGD, one per parameter element) both learn the inner step sizes: choose one"
        )
    if lslr and inner_steps < 1:
        raise ValueError("lslr=True learns one step size per inner step, so it needs inner_steps >= 1")
    if multi_step_loss and inner_steps < 1:
        raise ValueError(
            "multi_step_loss=True weighs the query loss after each inner step, so it needs inner_steps >= 1"
        )
    if msl_iterations and not multi_step_loss:
        raise ValueError("msl_iterations anneals the multi-step loss: set multi_step_loss=True, or leave it at 0")
    if first_order_iterations and first_order:
        raise ValueError(
            "first_order_iterations switches from first to second order after that many iterations, but "
            "first_order=True keeps first order throughout: set first_order=False, or first_order_iterations=0"
        )
    if first_order_iterations and inner_steps < 1:
        raise ValueError(
            "first_order_iterations needs inner_steps >= 1 (with no inner step there is no order to anneal)"
        )
    if norm == "inductive" and (strategy == "vmap" or compile):
        raise ValueError(
            "norm='inductive' updates running statistics in place during the query forward, which torch.func's "
            "vmap and torch.compile cannot do: use strategy='loop' or 'auto' (which then runs the loop) "
            "and compile=False"
        )
    if norm == "per_step" and inner_steps < 1:
        raise ValueError("norm='per_step' keeps normalisation parameters per inner step, so it needs inner_steps >= 1")
