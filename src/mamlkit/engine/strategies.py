"""How the tasks of a meta-batch are computed: one at a time, or together with ``vmap``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
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


# The same fault seen from below: the aten operations that those layers, and the functional forms a
# model may call itself (F.layer_norm, F.batch_norm, F.instance_norm, F.group_norm, F.rms_norm where
# it is fused), dispatch to. Measured wrong under vmap with torch 2.13 (float64, CPU):
# native_layer_norm and native_batch_norm with an affine weight (0.2-3% off the loop; instance
# norm runs native_batch_norm). The rest are listed without such a measurement: native_group_norm
# was exact in the same probe, and the fused RMS norm and the cuDNN, MIOpen and functionalised
# batch norms cannot be probed on a CPU. The module guard already keeps their layers off vmap, and
# a per-task loop costs only speed, never exactness.
_VMAP_UNSAFE_SECOND_ORDER_OPS = {
    "aten::native_layer_norm": "F.layer_norm / nn.LayerNorm",
    "aten::native_batch_norm": "F.batch_norm / F.instance_norm / nn.BatchNorm*d / nn.InstanceNorm*d",
    "aten::_native_batch_norm_legit": "F.batch_norm",
    "aten::_native_batch_norm_legit_no_training": "F.batch_norm",
    "aten::_native_batch_norm_legit_functional": "F.batch_norm",
    "aten::_batch_norm_with_update": "F.batch_norm",
    "aten::_batch_norm_with_update_functional": "F.batch_norm",
    "aten::_batch_norm_no_update": "F.batch_norm",
    "aten::cudnn_batch_norm": "F.batch_norm on cuDNN",
    "aten::miopen_batch_norm": "F.batch_norm on MIOpen",
    "aten::native_group_norm": "F.group_norm / nn.GroupNorm",
    "aten::_fused_rms_norm": "F.rms_norm / nn.RMSNorm (fused kernel)",
}


class _OpRecorder(TorchDispatchMode):
    """Records the name of every aten operation that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def vmap_unsafe_ops(fn: Callable, *args) -> dict[str, str]:
    """The operations ``fn(*args)`` runs whose second-order gradients are wrong under ``vmap``,
    as ``{aten name: the Python functions that call it}``.

    ``fn`` runs once, eagerly, with every operation recorded at the dispatcher (a
    ``TorchDispatchMode``), below autograd and the Python API. Whatever calls a fused
    normalisation kernel through the dispatcher is caught: a module type the module guard knows,
    ``F.layer_norm`` in a model's own forward, a library layer that wraps it. The record is of
    what runs, so it holds for the device, dtype and autocast it runs under; it costs one
    forward pass with a little Python per operation. Not seen: a kernel that another operation's
    kernel calls inside itself (a fused fast path such as ``aten::_transformer_encoder_layer_fwd``,
    which PyTorch takes only where no gradient is needed), and operations of inputs other than
    the one ``fn`` runs on.
    """
    with _OpRecorder() as recorder:
        fn(*args)
    unsafe = sorted(recorder.names & _VMAP_UNSAFE_SECOND_ORDER_OPS.keys())
    return {op: _VMAP_UNSAFE_SECOND_ORDER_OPS[op] for op in unsafe}


def refuse_vmap_for_ops(ops: dict[str, str]) -> None:
    """Raise the error for an explicit ``strategy='vmap'`` over ``ops`` (from :func:`vmap_unsafe_ops`)."""
    found = ", ".join(f"{op} (from {where})" for op, where in ops.items())
    raise ValueError(
        "strategy='vmap' would give a silently wrong second-order meta-gradient: the model's forward "
        f"calls {found}, whose second derivatives torch.func's vmap gets wrong (see "
        "docs/traps.md#normalisation-layers-under-vmap). "
        "Use strategy='loop' or 'auto' (auto then runs the loop), first_order=True, or "
        "mamlkit.models.layers.BatchNorm (plain tensor ops, exact under vmap)."
    )


def candidate_strategies(strategy: str, model: nn.Module, second_order: bool) -> list[str]:
    """The strategies ``strategy`` allows for ``model``, most likely fastest first.

    ``auto`` offers both where vmap is exact (the faster is then measured, since the ranking
    depends on the model and device: vmap wins for MLPs everywhere and for convs on GPUs, a
    loop can win for convs on a CPU) and only the loop where it is not. An explicit ``vmap``
    that would give a wrong meta-gradient is refused.

    This looks at module types only, before any input exists; a normalisation the model calls
    as a function is caught on the first meta-batch by :func:`vmap_unsafe_ops`.
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
