"""BatchNorm modes of the engine (``MAML(norm=...)``), put into the user's model at construction.

``transductive`` (the default) leaves the model alone: its BatchNorm normalises with the
statistics of the batch in front of it, at training and at test, as in the MAML paper.

The other two replace each batch normalisation layer of the model (``mamlkit.models.BatchNorm``,
``nn.BatchNorm1d/2d/3d``) by one of the layers here, which keep its parameters' names (so
``adapt=`` patterns still match) and are written in plain tensor operations (exact under vmap):

``per_step`` (MAML++'s per-step BatchNorm, Antoniou et al., ICLR 2019): the layer's weight and
bias get one row per inner step, shape ``[inner_steps, channels]``, each row initialised from the
original; the engine tells the layer the inner step through a buffer it passes with each call,
so the support forward of step k and the query forward after step k use row k (the query
before any step, row 0; steps beyond the last row reuse it). Statistics are the batch's: MAML++'s
code keeps running statistics per step but normalises with ``F.batch_norm(training=True)``, which
never reads them, so none are kept here.

``inductive``: running statistics (``running_mean``, ``running_var``, momentum 0.1, the unbiased
variance, as ``nn.BatchNorm``) are accumulated at meta-training from the query forward of every
task after its adaptation; every support forward (training and test) normalises with its own
batch statistics, and every other forward (the query at evaluation, ``maml(x, params)``)
normalises with the running statistics, so a query example is never normalised with the other
query examples. The engine sets the layers' ``phase`` around each call.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn


class _Norm(nn.Module):
    """Batch normalisation over every dimension but the channels (dim 1), in plain tensor ops."""

    def __init__(self, num_features: int, eps: float):
        super().__init__()
        self.num_features = num_features
        self.eps = eps

    @staticmethod
    def _dims(x: Tensor) -> list[int]:
        return [0] + list(range(2, x.dim()))

    @staticmethod
    def _shape(x: Tensor) -> list[int]:
        return [1, -1] + [1] * (x.dim() - 2)

    def _affine(self, y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        shape = self._shape(y)
        if weight is not None:
            y = y * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        return y


class PerStepBatchNorm(_Norm):
    """MAML++'s per-step BatchNorm: batch statistics, and a weight and bias row per inner step,
    chosen by the ``step`` buffer (an index the engine passes with each call)."""

    def __init__(self, num_features: int, steps: int, eps: float, weight: Tensor | None, bias: Tensor | None):
        super().__init__(num_features, eps)
        self.steps = steps
        self.weight = _rows(weight, steps) if weight is not None else None
        self.bias = _rows(bias, steps) if bias is not None else None
        like = weight if weight is not None else bias
        device = like.device if like is not None else None
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=device), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        dims = self._dims(x)
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        # index_select with the step as a tensor: no host synchronisation, no graph break under compile.
        index = self.step.reshape(1)
        weight = self.weight.index_select(0, index)[0] if self.weight is not None else None
        bias = self.bias.index_select(0, index)[0] if self.bias is not None else None
        return self._affine(y, weight, bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, steps={self.steps}, eps={self.eps}"


def _rows(t: Tensor, steps: int) -> nn.Parameter:
    """``t`` (one value per channel) repeated as ``steps`` rows, a new parameter."""
    return nn.Parameter(t.detach().clone().reshape(1, -1).repeat(steps, 1))


class InductiveBatchNorm(_Norm):
    """Batch statistics for support sets, running statistics (accumulated from the training query
    forwards) for everything else; ``phase`` is ``"rest"``, ``"batch"`` or ``"accumulate"``."""

    def __init__(
        self,
        num_features: int,
        eps: float,
        weight: Tensor | None,
        bias: Tensor | None,
        momentum: float = 0.1,
        running_mean: Tensor | None = None,
        running_var: Tensor | None = None,
    ):
        super().__init__(num_features, eps)
        self.momentum = momentum
        like = weight if weight is not None else bias
        kw = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        self.weight = nn.Parameter(weight.detach().clone()) if weight is not None else None
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        mean = running_mean.detach().clone() if running_mean is not None else torch.zeros(num_features, **kw)
        var = running_var.detach().clone() if running_var is not None else torch.ones(num_features, **kw)
        self.register_buffer("running_mean", mean)
        self.register_buffer("running_var", var)
        self.phase = "rest"

    def forward(self, x: Tensor) -> Tensor:
        shape = self._shape(x)
        if self.phase == "rest":
            mean = self.running_mean.view(shape).to(x.dtype)
            var = self.running_var.view(shape).to(x.dtype)
        else:
            dims = self._dims(x)
            mean = x.mean(dims, keepdim=True)
            var = ((x - mean) ** 2).mean(dims, keepdim=True)
            if self.phase == "accumulate":
                n = x.numel() // x.shape[1]
                with torch.no_grad():
                    unbiased = var.detach().reshape(-1) * (n / max(n - 1, 1))
                    self.running_mean.mul_(1 - self.momentum).add_(mean.detach().reshape(-1), alpha=self.momentum)
                    self.running_var.mul_(1 - self.momentum).add_(unbiased, alpha=self.momentum)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return self._affine(y, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


def _is_batch_norm(m: nn.Module) -> bool:
    """torch's BatchNorm1d/2d/3d, or ``mamlkit.models.BatchNorm`` (found by its class, which the
    engine, a layer below the models, does not import)."""
    if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
        return True
    return any(c.__name__ == "BatchNorm" and c.__module__ == "mamlkit.models.layers" for c in type(m).__mro__)


def convert_norms(model: nn.Module, norm: str, steps: int) -> list[str]:
    """Replace, in place, each batch normalisation layer of ``model`` by the layer of ``norm``
    (``per_step`` or ``inductive``); returns the paths replaced (none for ``transductive``)."""
    if norm == "transductive":
        return []
    found = [(name, m) for name, m in model.named_modules() if name and _is_batch_norm(m)]
    for name, m in found:
        weight = m.weight if getattr(m, "weight", None) is not None else None
        bias = m.bias if getattr(m, "bias", None) is not None else None
        like = weight if weight is not None else bias
        features = getattr(m, "num_features", None) or (like.numel() if like is not None else 0)
        if not features:
            raise ValueError(
                f"norm={norm!r} cannot tell the channels of '{name}' (a BatchNorm with no weight, bias or "
                "num_features): give it affine parameters, or use norm='transductive'"
            )
        if norm == "per_step":
            new: nn.Module = PerStepBatchNorm(features, steps, m.eps, weight, bias)
        else:
            momentum = getattr(m, "momentum", None)
            new = InductiveBatchNorm(
                features,
                m.eps,
                weight,
                bias,
                momentum=0.1 if momentum is None else momentum,
                running_mean=getattr(m, "running_mean", None),
                running_var=getattr(m, "running_var", None),
            )
        if weight is None and bias is None and hasattr(m, "running_mean") and m.running_mean is not None:
            new = new.to(m.running_mean.device)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return [name for name, _ in found]


@contextlib.contextmanager
def phase(modules: list[InductiveBatchNorm], value: str):
    """The inductive layers in ``phase`` inside the block, and in theirs again after it."""
    before = [m.phase for m in modules]
    for m in modules:
        m.phase = value
    try:
        yield
    finally:
        for m, p in zip(modules, before):
            m.phase = p
