"""How the tasks of a meta-batch are computed: one at a time, or together with ``vmap``."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.utils.checkpoint  # noqa: F401  (record_ops wraps its reentrant form)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

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


# Operations whose double backward is wrong with no error, on every strategy (the loop too), found by
# torch.autograd.gradgradcheck in float64 over the operations of the shipped and tested models and
# the layers a user is likely to add (tests/test_engine_inputs.py, test_double_backward_probe):
# the fused weight-norm kernel fails it, the same formula in plain ops (g * v / ||v||) passes.
# {aten name: (what calls it, the exact way to write it)}.
_WRONG_DOUBLE_BACKWARD_OPS = {
    "aten::_weight_norm_interface": (
        "weight normalisation (torch.nn.utils.parametrizations.weight_norm or torch.nn.utils.weight_norm)",
        "write the weight in plain tensor ops, g * v / v.norm(dim=<all but the output dim>, keepdim=True)",
    ),
}

# Operations with no double backward at all: second order through them stops with a PyTorch error
# deep inside the meta-backward pass (the same probe); refused up front with the way out instead.
_NO_DOUBLE_BACKWARD_OPS = {
    "aten::_cdist_forward": ("torch.cdist", "compute_mode='use_mm_for_euclid_dist' (p=2) or plain tensor ops"),
    "aten::_pdist_forward": ("torch.pdist / F.pdist", "plain tensor ops"),
    "aten::_embedding_bag": ("F.embedding_bag / nn.EmbeddingBag", "nn.Embedding followed by a sum or mean"),
    "aten::_ctc_loss": ("F.ctc_loss / nn.CTCLoss", "a loss with a second derivative"),
    "aten::hardsigmoid": ("F.hardsigmoid / nn.Hardsigmoid", "F.relu6(x + 3) / 6"),
}

# A marker that the recording's disable_saved_tensors_hooks puts into the error it raises.
_SAVED_TENSOR_HOOKS = "mamlkit: the model's forward pushes saved-tensor hooks"


class ModelOps(NamedTuple):
    """What one forward of a model ran, as :func:`record_ops` saw it."""

    ops: dict[str, tuple[str, bool]]  # aten name -> (module path that ran it, whether an input needed grad)
    checkpoint: str | None  # module path whose forward called torch.utils.checkpoint (or other saved-tensor hooks)


class _OpRecorder(TorchDispatchMode):
    """Records the name of every aten operation that reaches the dispatcher, with the innermost module
    that was running it and whether an input needed a gradient."""

    def __init__(self, modules: list[str] | None = None):
        super().__init__()
        self.names: set[str] = set()
        self.where: dict[str, tuple[str, bool]] = {}
        self.modules = modules if modules is not None else []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.names.add(name)
        grad = any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves((args, kwargs)))
        if name not in self.where or (grad and not self.where[name][1]):
            self.where[name] = (self.modules[-1] if self.modules else "", grad)
        return func(*args, **(kwargs or {}))


def record_ops(fn: Callable[[], object], model: nn.Module) -> ModelOps:
    """Run ``fn()`` once (a support forward and loss of ``model``) and record what it dispatches.

    Each aten operation is recorded with the innermost submodule of ``model`` whose forward ran it
    (through global module hooks, for this call only). ``torch.utils.checkpoint`` cannot be seen at
    the dispatcher, so it is caught where each form has to pass whatever name the model imported it
    by: the non-reentrant form pushes saved-tensor hooks, which the recording disables so that the
    push raises (as torch.func itself detects them), and the reentrant form calls
    ``CheckpointFunction.forward``, looked up on the class at each call, which the recording wraps
    for this call only. Patching ``torch.utils.checkpoint.checkpoint`` was not chosen: a model that
    imported the function (``from torch.utils.checkpoint import checkpoint``) holds its own
    reference. Looking for the reentrant form's node in the loss's graph was not either: it leaves
    none where its inputs need no gradient (the parameters it uses are not inputs).
    """
    names = {id(m): name for name, m in model.named_modules()}
    stack: list[str] = []

    def enter(module, args):
        if id(module) in names:
            stack.append(names[id(module)])

    def leave(module, args, out):
        if id(module) in names and stack:
            stack.pop()

    hooks = [
        nn.modules.module.register_module_forward_pre_hook(enter),
        nn.modules.module.register_module_forward_hook(leave),
    ]
    reentrant = getattr(torch.utils.checkpoint, "CheckpointFunction", None)
    original = reentrant.__dict__["forward"] if reentrant is not None else None

    def refuse_reentrant(*args, **kwargs):
        raise RuntimeError(_SAVED_TENSOR_HOOKS)

    checkpoint = None
    recorder = _OpRecorder(stack)
    try:
        if reentrant is not None:
            reentrant.forward = staticmethod(refuse_reentrant)
        with recorder, torch.autograd.graph.disable_saved_tensors_hooks(_SAVED_TENSOR_HOOKS):
            fn()
    except RuntimeError as e:
        if _SAVED_TENSOR_HOOKS not in str(e):
            raise
        checkpoint = stack[-1] if stack else ""
    finally:
        for h in hooks:
            h.remove()
        if reentrant is not None:
            reentrant.forward = original
    return ModelOps(dict(recorder.where), checkpoint)


def module_label(model: nn.Module, path: str) -> str:
    """``nn.LayerNorm at 'net.3'``: a submodule of ``model`` by its type and path, for messages."""
    kind = type(dict(model.named_modules()).get(path, model))
    name = f"nn.{kind.__name__}" if kind.__module__.startswith("torch.nn") else kind.__name__
    return f"{name} at '{path}'" if path else f"the model's own forward ({name})"


def refuse_second_order_ops(found: ModelOps, model: nn.Module) -> None:
    """Raise for an operation whose double backward is wrong or missing, which second-order MAML needs."""
    tables = ((_WRONG_DOUBLE_BACKWARD_OPS, "is wrong with no error"), (_NO_DOUBLE_BACKWARD_OPS, "is missing"))
    for op, (path, grad) in found.ops.items():
        for table, fault in tables:
            if op in table and grad:
                what, fix = table[op]
                where = module_label(model, path)
                raise ValueError(
                    f"second-order MAML needs the second derivative of {what}, which {where} calls ({op}), and "
                    f"PyTorch's {fault} for it (docs/traps.md#operations-with-a-wrong-double-backward): use "
                    f"first_order=True, or {fix}."
                )


def refuse_checkpoint(found: ModelOps, model: nn.Module) -> None:
    """Raise where the model's forward calls ``torch.utils.checkpoint``."""
    if found.checkpoint is None:
        return
    path = found.checkpoint
    where = "the model's forward" if path == "" else f"the forward of '{path}'"
    raise ValueError(
        f"{where} calls torch.utils.checkpoint (or pushes other saved-tensor hooks), which MAML's inner loop "
        "cannot differentiate: torch.func rejects it and the autograd path gets the meta-gradient wrong "
        "(docs/traps.md#activation-checkpointing-inside-a-model). Remove it from the model and use "
        "MAML(checkpoint_inner=True) to save memory instead."
    )


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


def fastest(
    run: Callable[[str], None],
    candidates: list[str],
    sync: Callable[[], None],
    repeats: int = 3,
    errors: dict[str, str] | None = None,
) -> dict:
    """Time ``run(strategy)`` for each candidate (best of ``repeats`` after one warm-up).

    A candidate that fails (out of memory, say) is timed as infinitely slow, and its error is put in
    ``errors``.
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
        except (RuntimeError, MemoryError) as e:
            best = float("inf")
            if errors is not None:
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
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
        task_args = [
            (a[i] if isinstance(a, torch.Tensor) else tree_map(lambda t, i=i: t[i], a)) if d == 0 else a
            for a, d in zip(args, in_dims)
        ]
        outs.append(fn(*task_args))
    return tree_map(lambda *xs: torch.stack(xs), *outs) if not isinstance(outs[0], torch.Tensor) else torch.stack(outs)


def _num_tasks(args, in_dims) -> int:
    for a, d in zip(args, in_dims):
        if d == 0:
            leaves = [t for t in torch.utils._pytree.tree_leaves(a) if isinstance(t, torch.Tensor)]
            if leaves:
                return leaves[0].shape[0]
    raise ValueError("map_tasks needs at least one argument with a task dimension")
