"""Checks of what a caller hands the engine: step sizes, step counts, meta-batches. Each fails with one
sentence that names the problem and what was expected, before anything deep inside torch can."""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

FIELDS = ("support_inputs", "support_targets", "query_inputs", "query_targets")


def check_steps(steps: Any, what: str = "steps") -> int:
    """``steps`` as an int >= 0 (a bool is refused: ``True`` steps is a typo, not one step)."""
    if isinstance(steps, bool) or not isinstance(steps, Integral):
        raise TypeError(f"{what} must be an int >= 0, got {steps!r} ({type(steps).__name__})")
    if steps < 0:
        raise ValueError(f"{what} must be >= 0, got {steps}")
    return int(steps)


def check_step_size(lr: Any, what: str = "lr") -> None:
    """One step size: a finite number >= 0 (0 takes no step), a one-element tensor, or Meta-SGD's
    per-parameter mapping. A tensor's value is checked where it can be read; a learned one (one that
    requires grad, Meta-SGD's) is not, since training moves it, nor one inside a torch.func transform."""
    if isinstance(lr, bool):
        raise TypeError(f"{what} must be a number >= 0, got {lr!r}")
    if isinstance(lr, Real):
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"{what} must be a finite number >= 0, got {lr!r}")
        return
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{what} as a tensor must hold one value (a step size), got shape {tuple(lr.shape)}")
        if _concrete(lr) and not lr.requires_grad:
            value = lr.detach().item()
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{what} must be a finite number >= 0, got tensor({value})")
        return
    if isinstance(lr, Mapping):
        return
    raise TypeError(
        f"{what} must be a number >= 0, a one-element tensor, or one per step (a list), got {type(lr).__name__}"
    )


def step_sizes(lr: Any, steps: int, what: str = "lr") -> list:
    """One step size per step from ``lr``: a single value, or a schedule (a list or tuple) whose last
    value repeats."""
    if isinstance(lr, list | tuple):
        if not lr:
            raise ValueError(f"{what} is an empty list; give one step size, or one per step")
        for i, value in enumerate(lr):
            check_step_size(value, f"{what}[{i}]")
        return [lr[min(i, len(lr) - 1)] for i in range(steps)]
    check_step_size(lr, what)
    return [lr] * steps


def task_count(batch: Any) -> int:
    """The number of tasks of a meta-batch: the leading dimension every tensor of its four fields
    shares. Refuses a batch whose fields disagree (the loop would use only the first tasks) and an
    empty one."""
    if not isinstance(batch, tuple) or len(batch) != 4:
        raise TypeError(
            f"expected a TaskBatch({', '.join(FIELDS)}), got {type(batch).__name__}"
            + (f" of {len(batch)} fields" if isinstance(batch, tuple) else "")
        )
    counts: dict[int, list[str]] = {}
    for field, value in zip(FIELDS, batch):
        leaves = tree_leaves(value)
        if not leaves:
            raise ValueError(f"TaskBatch.{field} holds no tensor; every field needs one entry per task")
        for leaf in leaves:
            if not isinstance(leaf, Tensor) or leaf.dim() == 0:
                got = f"a {leaf.dim()}-d tensor" if isinstance(leaf, Tensor) else type(leaf).__name__
                raise TypeError(f"TaskBatch.{field} must hold tensors with a leading task dimension, got {got}")
            counts.setdefault(leaf.shape[0], []).append(field)
    if len(counts) > 1:
        found = "; ".join(f"{n} in {', '.join(dict.fromkeys(fields))}" for n, fields in counts.items())
        raise ValueError(
            f"TaskBatch fields disagree on the number of tasks (their leading dimension): {found}; "
            "every field needs one entry per task"
        )
    n = next(iter(counts))
    if n == 0:
        raise ValueError("the TaskBatch holds 0 tasks; a meta-batch needs at least one")
    return n


def _concrete(t: Tensor) -> bool:
    """Whether ``t``'s value can be read: not a torch.func wrapper, a fake or a meta tensor."""
    return not torch._C._functorch.is_functorch_wrapped_tensor(t) and t.device.type != "meta"
