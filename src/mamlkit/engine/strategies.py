"""How the tasks of a meta-batch are computed: one at a time, or together with ``vmap``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_map

STRATEGIES = ("auto", "loop", "vmap")

# Under vmap, second-order gradients through these layers' fused kernels come out wrong with
# no error (0.07-1.3% off finite differences; docs/traps.md#normalisation-layers-under-vmap);
# a per-task loop is exact, and the same maths in plain tensor ops (mamlkit.models.layers) is
# exact under vmap.
_VMAP_UNSAFE_SECOND_ORDER: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, InstanceNorm*d
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def vmap_unsafe_modules(model: nn.Module) -> list[str]:
    """Names of submodules whose second-order gradients are wrong under ``vmap``."""
    return [
        name or type(model).__name__ for name, m in model.named_modules() if isinstance(m, _VMAP_UNSAFE_SECOND_ORDER)
    ]


def candidate_strategies(strategy: str, model: nn.Module, second_order: bool) -> list[str]:
    """The strategies ``strategy`` allows for ``model``, most likely fastest first.

    ``auto`` offers both where vmap is exact (the faster is then measured, since the ranking
    depends on the model and device: vmap wins for MLPs everywhere and for convs on GPUs, a
    loop can win for convs on a CPU) and only the loop where it is not. An explicit ``vmap``
    that would give a wrong meta-gradient is refused.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    unsafe = vmap_unsafe_modules(model) if second_order else []
    if strategy == "auto":
        return ["loop"] if unsafe else ["vmap", "loop"]
    if strategy == "vmap" and unsafe:
        raise ValueError(
            "strategy='vmap' would give a silently wrong second-order meta-gradient through "
            f"the normalisation layers {unsafe} (a torch.func limitation, see "
            "docs/traps.md#normalisation-layers-under-vmap). "
            "Use strategy='loop' or 'auto', first_order=True, or mamlkit.models.layers.BatchNorm "
            "(plain tensor ops, exact under vmap)."
        )
    return [strategy]


def fastest(run: Callable[[str], None], candidates: list[str], sync: Callable[[], None], repeats: int = 3) -> dict:
    """Time ``run(strategy)`` for each candidate (best of ``repeats`` after one warm-up).

    A candidate that fails (out of memory, say) is timed as infinitely slow.
    """
    import time

    timings = {}
    for name in candidates:
        best = float("inf")
        try:
            for i in range(repeats + 1):
                sync()
                t0 = time.perf_counter()
                run(name)
                sync()
                if i:
                    best = min(best, time.perf_counter() - t0)
        except (RuntimeError, MemoryError):
            best = float("inf")
        timings[name] = best
    return timings


def map_tasks(fn: Callable, in_dims: tuple, *args, strategy: str = "vmap"):
    """Apply ``fn`` to each task: ``in_dims[i]`` is 0 where ``args[i]`` has a task dimension
    and ``None`` where it is shared; outputs are stacked along a new leading dimension."""
    if strategy == "vmap":
        return torch.func.vmap(fn, in_dims=in_dims, randomness="different")(*args)
    n = _num_tasks(args, in_dims)
    outs = []
    for i in range(n):
        task_args = [tree_map(lambda t, i=i: t[i], a) if d == 0 else a for a, d in zip(args, in_dims)]
        outs.append(fn(*task_args))
    return tree_map(lambda *xs: torch.stack(xs), *outs) if not isinstance(outs[0], torch.Tensor) else torch.stack(outs)


def _num_tasks(args, in_dims) -> int:
    for a, d in zip(args, in_dims):
        if d == 0:
            leaves = [t for t in torch.utils._pytree.tree_leaves(a) if isinstance(t, torch.Tensor)]
            if leaves:
                return leaves[0].shape[0]
    raise ValueError("map_tasks needs at least one argument with a task dimension")
