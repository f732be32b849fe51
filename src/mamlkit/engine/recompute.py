"""Second-order inner steps recomputed in the backward pass (``MAML(checkpoint_inner=True)``):
memory per step drops to about the parameters', at the cost of one more support forward."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .functional import FunctionalModel, Params


def recomputed_inner_step(
    fmodel: FunctionalModel,
    loss_fn,
    names: list[str],
    params: Params,
    inputs,
    targets,
    lr,
    key: Callable[[str], str],
    buffers: list[Tensor] = (),
) -> Params:
    """A second-order inner step that keeps only its inputs and rebuilds its graph in the
            backward pass (``checkpoint_inner``), with autograd instead of torch.func.

            The support forward runs twice in all: once here, for a first-order gradient whose graph
            is freed at once, and once in the backward pass, with the second-order graph that the
            meta-gradient goes through (:class:`_RecomputedInnerStep`). ``torch.utils.checkpoint``
            ran it three times: the step's own gradient, taken inside the checkpointed function,
            unpacked the activations that checkpoint had just dropped and recomputed them during the
            forward pass, and the backward pass recomputed them again.

    ``names``: the parameters the step adapts, whether or not they require grad now (the set the
    other strategies adapt); ``lr`` one step size (a number or a tensor, whose gradient is kept), or
    Meta-SGD's per parameter, found by ``key(name)``. ``buffers``: the model's buffers that its
    forward updates in place, put back as they were in the forward pass while it is recomputed.
    """
    param_names = list(params)
    per_param = isinstance(lr, nn.ParameterDict | dict)
    lr_names = names if per_param else (["lr"] if isinstance(lr, Tensor) else [])
    data, spec = torch.utils._pytree.tree_flatten((inputs, targets))
    data_at = [i for i, x in enumerate(data) if isinstance(x, Tensor)]
    n_params, n_lrs = len(param_names), len(lr_names)

    def step(tensors: list[Tensor], create_graph: bool) -> tuple[Tensor, ...]:
        p = dict(zip(param_names, tensors[:n_params]))
        lrs = dict(zip(lr_names, tensors[n_params : n_params + n_lrs]))
        leaves = list(data)
        for i, t in zip(data_at, tensors[n_params + n_lrs :]):
            leaves[i] = t
        x, y = torch.utils._pytree.tree_unflatten(leaves, spec)
        loss = loss_fn(fmodel(p, x), y)
        grads = torch.autograd.grad(loss, [p[n] for n in names], create_graph=create_graph, allow_unused=True)
        size = (lambda n: lrs[n]) if per_param else (lambda n: lrs["lr"]) if lr_names else (lambda n: lr)
        return tuple(p[n] if g is None else p[n] - size(n) * g for n, g in zip(names, grads))

    lr_tensors = [lr[key(n)] for n in lr_names] if per_param else [lr] if lr_names else []
    tensors = [params[n] for n in param_names] + lr_tensors + [data[i] for i in data_at]
    # The step differentiates the adapted parameters even where they do not require grad (frozen since
    # construction): their recomputed leaves must, whatever the meta-gradient needs.
    adapted = set(names)
    differentiated = [n in adapted for n in param_names] + [False] * (len(tensors) - n_params)
    out = _RecomputedInnerStep.apply(step, differentiated, list(buffers), *tensors)
    return {**params, **dict(zip(names, out))}


class _RecomputedInnerStep(torch.autograd.Function):
    """``step(tensors, create_graph)`` -> new parameters, differentiated by recomputing it.

    The forward pass runs ``step`` once without a second-order graph and saves only its input
    tensors. The backward pass runs it again with ``create_graph=True``, under the random-number
    and autocast state of the forward pass (so dropout and bf16 recompute what ran), and takes the
    vector-Jacobian product through it. Asked for a graph (``create_graph=True``, a Hessian-vector
    product of the meta-loss), it recomputes on views of the saved inputs rather than detached
    copies, so that the gradient it returns is connected to their history and differentiable;
    each input gets its own view, so that the product is taken w.r.t. each input alone (the step
    size is also an ancestor of the previous step's output).
    """

    @staticmethod
    def forward(ctx, step, differentiated, buffers, *tensors):
        ctx.step, ctx.differentiated, ctx.buffers = step, differentiated, buffers
        ctx.buffer_values = [b.detach().clone() for b in buffers]
        ctx.devices = sorted({t.device for t in tensors if t.device.type == "cuda"}, key=str)
        ctx.rng = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in ctx.devices]
        ctx.autocast = {
            dev: (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
            for dev in ["cpu"] + (["cuda"] if ctx.devices else [])
        }
        ctx.save_for_backward(*tensors)
        with torch.enable_grad():
            out = step(
                [t.detach().requires_grad_(t.requires_grad or d) for t, d in zip(tensors, differentiated)],
                create_graph=False,
            )
        return tuple(o.detach() for o in out)

    @staticmethod
    def backward(ctx, *grad_out):
        tensors = ctx.saved_tensors
        wanted = ctx.needs_input_grad[3:]
        higher = torch.is_grad_enabled()  # on in a backward pass only under create_graph=True
        with contextlib.ExitStack() as stack:
            stack.enter_context(_replayed(ctx.buffers, ctx.buffer_values))
            stack.enter_context(torch.random.fork_rng(devices=ctx.devices))
            torch.set_rng_state(ctx.rng[0])
            for d, state in zip(ctx.devices, ctx.rng[1]):
                torch.cuda.set_rng_state(state, d)
            for dev, (enabled, dtype) in ctx.autocast.items():
                stack.enter_context(torch.autocast(dev, dtype=dtype, enabled=enabled))
            stack.enter_context(torch.enable_grad())
            leaves = [
                # Under higher order, a fresh node per input: no gradient reaches one input through another's history.
                t.view_as(t) if higher and w else t.detach().requires_grad_(w or d)
                for t, w, d in zip(tensors, wanted, ctx.differentiated)
            ]
            out = ctx.step(leaves, create_graph=True)
            wrt = [t for t, w in zip(leaves, wanted) if w]
            grads = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True, create_graph=higher))
        return (None, None, None, *(next(grads) if w else None for w in wanted))


@contextlib.contextmanager
def _replayed(buffers: list[Tensor], values: list[Tensor]):
    """The buffers hold ``values`` inside the block, and their own values again after it."""
    if not buffers:
        yield
        return
    now = [b.detach().clone() for b in buffers]
    with torch.no_grad():
        for b, v in zip(buffers, values):
            b.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in zip(buffers, now):
                b.copy_(v)
