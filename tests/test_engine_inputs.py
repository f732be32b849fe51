"""The engine's checks of what a caller hands it, and of what a model's forward does, each against an
independent computation (float64): bad inputs fail with one sentence, and every strategy computes the
same thing or none does."""

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from helpers import finite_difference_grad, float64  # noqa: F401  (float64: autouse)
from helpers import make_batch as _make_batch
from mamlkit import MAML, TaskBatch

STRATEGIES = [dict(strategy="loop"), dict(strategy="vmap"), dict(strategy="auto"), dict(checkpoint_inner=True)]
STRATEGY_IDS = ["loop", "vmap", "auto", "checkpoint_inner"]


def make_batch(tasks=3, k=8, q=8, **kw):
    return _make_batch(tasks, k, q, **kw)


def mlp():
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1))


def meta_grad(maml, batch, tensors=None):
    tensors = tensors or [p for p in maml.parameters() if p.requires_grad]
    return torch.autograd.grad(maml.meta_loss(batch), tensors, allow_unused=True)


def relative_error(got, want):
    num = sum(((g - w) ** 2).sum() for g, w in zip(got, want)) ** 0.5
    return (num / sum((w**2).sum() for w in want) ** 0.5).item()


# -- 1. meta-batches, step sizes, step counts ---------------------------------------------------------


def with_tasks(batch, field, n):
    parts = list(batch)
    i = TaskBatch._fields.index(field)
    parts[i] = parts[i][:n] if n <= parts[i].shape[0] else torch.cat([parts[i], parts[i][: n - parts[i].shape[0]]])
    return TaskBatch(*parts)


@pytest.mark.parametrize("kwargs", STRATEGIES + [dict(strategy="vmap", compile=True)], ids=STRATEGY_IDS + ["compile"])
@pytest.mark.parametrize("field, n", [("query_inputs", 5), ("query_targets", 2), ("support_targets", 4)])
def test_task_counts_must_agree(kwargs, field, n):
    """The loop used to run the first ``len(support)`` tasks of a longer query set, silently."""
    maml = MAML(mlp(), inner_lr=0.1, **kwargs)
    bad = with_tasks(make_batch(), field, n)
    for call in (maml.meta_loss, maml.meta_forward, maml.meta_backward, lambda b: maml.adaptation_curve(b, 1)):
        with pytest.raises(ValueError, match=f"disagree on the number of tasks.*{field}"):
            call(bad)


def test_an_empty_meta_batch_is_refused():
    maml = MAML(mlp(), inner_lr=0.1, strategy="loop")
    empty = TaskBatch(*(t[:0] for t in make_batch()))
    for call in (maml.meta_loss, lambda b: maml.adaptation_curve(b, 1)):
        with pytest.raises(ValueError, match="0 tasks"):
            call(empty)
    with pytest.raises(TypeError, match="leading task dimension"):
        maml.meta_loss(TaskBatch(torch.tensor(1.0), *make_batch()[1:]))


BAD_STEP_SIZES = [math.nan, math.inf, -0.1, torch.tensor(math.nan), torch.tensor(-1.0)]


@pytest.mark.parametrize("lr", BAD_STEP_SIZES, ids=["nan", "inf", "negative", "tensor-nan", "tensor-negative"])
def test_step_sizes_must_be_finite_and_not_negative(lr):
    batch = make_batch()
    x, y = batch.support_inputs[0], batch.support_targets[0]
    with pytest.raises(ValueError, match="inner_lr must be a finite number >= 0"):
        MAML(mlp(), inner_lr=lr)
    maml = MAML(mlp(), inner_lr=0.1)
    for bad in (lr, [0.1, lr]):
        with pytest.raises(ValueError, match="lr.* must be a finite number >= 0"):
            maml.adapt(x, y, steps=2, lr=bad)
        with pytest.raises(ValueError, match="lr.* must be a finite number >= 0"):
            maml.adaptation_curve(batch, steps=2, lr=bad)
    maml.inner_lr = lr  # set after construction: caught at the next meta-batch
    with pytest.raises(ValueError, match="inner_lr must be a finite number >= 0"):
        maml.meta_loss(batch)


def test_step_counts_and_empty_schedules_are_refused():
    batch = make_batch()
    x, y = batch.support_inputs[0], batch.support_targets[0]
    maml = MAML(mlp(), inner_lr=0.1)
    for steps, error in ((-1, ValueError), (True, TypeError), (1.5, TypeError)):
        with pytest.raises(error, match="steps must be"):
            MAML(mlp(), inner_steps=steps)
        with pytest.raises(error, match="steps must be"):
            maml.adapt(x, y, steps=steps)
        with pytest.raises(error, match="steps must be"):
            maml.adaptation_curve(batch, steps=steps)
    with pytest.raises(ValueError, match="empty list"):
        maml.adapt(x, y, lr=[])
    with pytest.raises(TypeError, match="lr must be a number"):
        maml.adapt(x, y, lr="0.1")


def test_zero_step_size_and_tensor_step_sizes_are_allowed():
    torch.manual_seed(30)
    batch = make_batch()
    x, y = batch.support_inputs[0], batch.support_targets[0]
    maml = MAML(mlp(), inner_lr=0.1)
    unchanged = maml.adapt(x, y, steps=2, lr=0.0)
    for n, p in maml.params().items():
        torch.testing.assert_close(unchanged[n], p, rtol=0, atol=0)
    by_float = maml.adapt(x, y, steps=2, lr=[0.1, 0.05])
    by_tensor = maml.adapt(x, y, steps=2, lr=[torch.tensor(0.1), torch.tensor(0.05)])
    one_tensor = maml.adapt(x, y, steps=2, lr=torch.tensor(0.1))
    for n in by_float:
        torch.testing.assert_close(by_tensor[n], by_float[n])
        torch.testing.assert_close(one_tensor[n], maml.adapt(x, y, steps=2, lr=0.1)[n])


# -- 2. operations whose double backward is wrong or missing -----------------------------------------


_SEEDS = iter(range(1000))


def _r(*shape, positive=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(next(_SEEDS)))
    return (t.abs() + 0.5 if positive else t).requires_grad_()


# The operations of the shipped models (linear, conv2d, max_pool2d, relu, tanh, exp, baddbmm, rsqrt,
# the losses), of the test suite's models, and the layers a user is likely to add.
DOUBLE_BACKWARD_PROBE = {
    "linear": lambda: (F.linear, (_r(4, 3), _r(2, 3), _r(2))),
    "conv1d": lambda: (F.conv1d, (_r(2, 2, 5), _r(3, 2, 3), _r(3))),
    "conv2d": lambda: (lambda x, w, b: F.conv2d(x, w, b, padding=1), (_r(2, 2, 4, 4), _r(3, 2, 3, 3), _r(3))),
    "conv_transpose2d": lambda: (F.conv_transpose2d, (_r(2, 2, 3, 3), _r(2, 3, 2, 2), _r(3))),
    "layer_norm": lambda: (lambda x, w, b: F.layer_norm(x, (3,), w, b), (_r(4, 3), _r(3), _r(3))),
    "batch_norm": lambda: (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), (_r(5, 3), _r(3), _r(3))),
    "instance_norm": lambda: (lambda x, w, b: F.instance_norm(x, weight=w, bias=b), (_r(2, 3, 5), _r(3), _r(3))),
    "group_norm": lambda: (lambda x, w, b: F.group_norm(x, 2, w, b), (_r(3, 4, 3), _r(4), _r(4))),
    "rms_norm": lambda: (lambda x, w: F.rms_norm(x, (3,), w), (_r(4, 3), _r(3))),
    "weight_norm": lambda: (lambda v, g: torch._weight_norm(v, g, 0), (_r(3, 4), _r(3, 1, positive=True))),
    "weight_norm_conv": lambda: (lambda v, g: torch._weight_norm(v, g, 0), (_r(3, 2, 2, 2), _r(3, 1, 1, 1))),
    "weight_norm_plain_ops": lambda: (lambda v, g: g * v / v.norm(dim=1, keepdim=True), (_r(3, 4), _r(3, 1))),
    "spectral_norm_ops": lambda: (lambda w, u, v: torch.dot(u, torch.mv(w, v)), (_r(3, 4), _r(3), _r(4))),
    "normalize": lambda: (lambda x: F.normalize(x, dim=0), (_r(4, 3),)),
    "embedding": lambda: (lambda w: F.embedding(torch.tensor([0, 2, 1, 2]), w), (_r(3, 4),)),
    "gru_cell": lambda: (torch.gru_cell, (_r(2, 3), _r(2, 4), _r(12, 3), _r(12, 4), _r(12), _r(12))),
    "lstm_cell": lambda: (
        lambda x, h, c, wi, wh, bi, bh: torch.lstm_cell(x, (h, c), wi, wh, bi, bh)[0],
        (_r(2, 3), _r(2, 4), _r(2, 4), _r(16, 3), _r(16, 4), _r(16), _r(16)),
    ),
    "log_softmax": lambda: (lambda x: F.log_softmax(x, -1), (_r(4, 3),)),
    "cross_entropy": lambda: (lambda x: F.cross_entropy(x, torch.tensor([0, 2, 1, 2])), (_r(4, 3),)),
    "mse_loss": lambda: (F.mse_loss, (_r(4, 3), _r(4, 3))),
    "max_pool2d": lambda: (lambda x: F.max_pool2d(x, 2), (_r(1, 2, 4, 4),)),
    "avg_pool2d": lambda: (lambda x: F.avg_pool2d(x, 2), (_r(1, 2, 4, 4),)),
    "dropout": lambda: (lambda x: (torch.manual_seed(0), F.dropout(x, 0.3))[1], (_r(4, 3),)),
    "gelu": lambda: (F.gelu, (_r(4, 3),)),
    "silu": lambda: (F.silu, (_r(4, 3),)),
    "elu": lambda: (F.elu, (_r(4, 3),)),
    "softplus": lambda: (F.softplus, (_r(4, 3),)),
    "hardswish": lambda: (F.hardswish, (_r(4, 3),)),
    "exp": lambda: (torch.exp, (_r(4, 3),)),
    "rsqrt": lambda: (torch.rsqrt, (_r(4, 3, positive=True),)),
    "baddbmm": lambda: (torch.baddbmm, (_r(2, 3, 4), _r(2, 3, 2), _r(2, 2, 4))),
    "scaled_dot_product_attention": lambda: (F.scaled_dot_product_attention, (_r(1, 3, 4), _r(1, 3, 4), _r(1, 3, 4))),
    # No double backward at all (a PyTorch error in the meta-backward pass): refused up front too.
    "cdist": lambda: (torch.cdist, (_r(4, 3), _r(2, 3))),
    "pdist": lambda: (torch.pdist, (_r(4, 3),)),
    "embedding_bag": lambda: (lambda w: F.embedding_bag(torch.tensor([0, 2, 1]), w, torch.tensor([0, 2])), (_r(3, 4),)),
    "hardsigmoid": lambda: (F.hardsigmoid, (_r(4, 3),)),
}
WRONG = {"weight_norm", "weight_norm_conv"}
MISSING = {"cdist", "pdist", "embedding_bag", "hardsigmoid"}


def test_double_backward_probe():
    """gradgradcheck (float64) of each operation: the fused weight-norm kernel's double backward is
    wrong, a few have none, the rest are exact. If a PyTorch release fixes one, this test fails and
    the engine's list (_WRONG_DOUBLE_BACKWARD_OPS, _NO_DOUBLE_BACKWARD_OPS in engine/strategies.py)
    can shrink; an operation a model starts to use belongs here."""
    wrong, missing = set(), set()
    for name, case in DOUBLE_BACKWARD_PROBE.items():
        fn, inputs = case()
        try:
            if not torch.autograd.gradgradcheck(fn, inputs, raise_exception=False):
                wrong.add(name)
        except (RuntimeError, NotImplementedError):
            missing.add(name)
    assert wrong == WRONG and missing == MISSING


class WeightNormNet(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(2, 6)
        if kind == "parametrization":
            self.fc1 = nn.utils.parametrizations.weight_norm(self.fc1)
        elif kind == "hook":
            with pytest.warns(FutureWarning):
                self.fc1 = nn.utils.weight_norm(self.fc1)
        else:  # the same maths in plain ops, the fix the refusal names
            self.g = nn.Parameter(self.fc1.weight.norm(dim=1, keepdim=True).detach().clone())
        self.fc2 = nn.Linear(6, 1)

    def forward(self, x):
        if self.kind == "plain":
            w = self.g * self.fc1.weight / self.fc1.weight.norm(dim=1, keepdim=True)
            h = F.linear(x, w, self.fc1.bias)
        else:
            h = self.fc1(x)
        return self.fc2(torch.tanh(h))


@pytest.mark.parametrize("kwargs", STRATEGIES, ids=STRATEGY_IDS)
@pytest.mark.parametrize("kind", ["parametrization", "hook"])
def test_second_order_through_weight_norm_is_refused(kwargs, kind):
    torch.manual_seed(31)
    model = WeightNormNet(kind)
    batch = make_batch()
    maml = MAML(model, inner_lr=0.3, inner_steps=2, **kwargs)
    # A first-order adapt from detached parameters (as RL's sampling takes) is fine, and does not hide
    # the operation from the second-order meta-batch after it.
    detached = {n: p.detach() for n, p in maml.params().items()}
    maml.adapt(batch.support_inputs[0], batch.support_targets[0], params=detached)
    for _ in range(2):  # on every call
        with pytest.raises(ValueError, match="_weight_norm_interface") as err:
            maml.meta_loss(batch)
    module = "nn.Linear at 'fc1'" if kind == "hook" else "at 'fc1.parametrizations.weight.0'"
    for fix in ("first_order=True", "g * v / v.norm", module):
        assert fix in str(err.value)
    with pytest.raises(ValueError, match="_weight_norm_interface"):
        MAML(model, inner_lr=0.3).adapt(batch.support_inputs[0], batch.support_targets[0], create_graph=True)
    # First order needs no second derivative: allowed, and the same on every strategy.
    fo = MAML(model, inner_lr=0.3, inner_steps=2, first_order=True, **kwargs)
    want = meta_grad(MAML(model, inner_lr=0.3, inner_steps=2, first_order=True, strategy="loop"), batch)
    for g, w in zip(meta_grad(fo, batch), want):
        torch.testing.assert_close(g, w)


def test_the_weight_norm_trap_is_real_and_the_plain_formula_is_exact():
    """Why the refusal exists: past the guard, the second-order meta-gradient through weight norm is
    several percent off finite differences on the per-task loop; the plain-ops formula is exact.
    If a PyTorch release makes the first check fail, the guard can be relaxed."""
    from mamlkit.engine.strategies import ModelOps

    torch.manual_seed(31)
    batch = make_batch()
    maml = MAML(WeightNormNet("parametrization"), inner_lr=0.3, inner_steps=2, strategy="loop")
    maml._ops = ModelOps({}, None)  # bypasses the guard: nothing recorded
    params = [p for p in maml.parameters() if p.requires_grad]
    want = finite_difference_grad(lambda: maml.meta_loss(batch), params)
    assert relative_error(meta_grad(maml, batch), want) > 1e-3
    plain = MAML(WeightNormNet("plain"), inner_lr=0.3, inner_steps=2, strategy="vmap")
    params = [p for p in plain.parameters() if p.requires_grad]
    want = finite_difference_grad(lambda: plain.meta_loss(batch), params)
    for g, w in zip(meta_grad(plain, batch), want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-8)


# -- 3. torch.utils.checkpoint inside a model's forward ----------------------------------------------


class CheckpointedNet(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.fc1 = nn.Linear(2, 6)
        self.fc2 = nn.Linear(6, 1)

    def forward(self, x):
        h = checkpoint(lambda x: torch.tanh(self.fc1(x)), x, use_reentrant=self.reentrant)
        return self.fc2(h)


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("kwargs", STRATEGIES, ids=STRATEGY_IDS)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpoint_inside_the_model_is_refused(reentrant, kwargs, first_order):
    """The loop failed with torch.func's error, checkpoint_inner returned a wrong meta-gradient."""
    maml = MAML(CheckpointedNet(reentrant), inner_lr=0.3, inner_steps=2, first_order=first_order, **kwargs)
    for _ in range(2):
        with pytest.raises(ValueError, match="torch.utils.checkpoint.*checkpoint_inner=True"):
            maml.meta_loss(make_batch())
    with pytest.raises(ValueError, match="torch.utils.checkpoint"):
        maml.adaptation_curve(make_batch(), steps=1)


# -- 4. buffers that the forward updates in place -----------------------------------------------------


def spectral_net():
    return nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(2, 6)), nn.Tanh(), nn.Linear(6, 1))


def test_buffers_updated_in_place_end_the_same_on_every_strategy():
    """Spectral norm in training mode runs a power-iteration step on its buffers at every forward.
    auto's measurement runs used to advance them (auto's meta-gradient 1e-4 off the loop's), and
    checkpoint_inner's recomputation advanced them again and recomputed with the advanced ones."""
    torch.manual_seed(32)
    model = spectral_net()
    batch = make_batch()
    results = {}
    for name, kwargs in zip(["loop", "auto", "checkpoint_inner"], [STRATEGIES[0], STRATEGIES[2], STRATEGIES[3]]):
        copied = copy.deepcopy(model)
        maml = MAML(copied, inner_lr=0.3, inner_steps=2, **kwargs)
        grads = meta_grad(maml, batch)
        results[name] = grads, [b.clone() for b in copied.buffers()]
        assert maml.strategy == "loop"  # vmap cannot batch the in-place update
    for name in ("auto", "checkpoint_inner"):
        (grads, buffers), (want_grads, want_buffers) = results[name], results["loop"]
        for got, want in zip(grads + tuple(buffers), want_grads + tuple(want_buffers), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="updates buffers in place.*eval mode"):
        MAML(spectral_net(), inner_lr=0.3, strategy="vmap").meta_loss(batch)


# -- 5. every strategy adapts the same parameters and differentiates the same inputs ------------------


def test_every_strategy_adapts_the_construction_time_parameters_and_learns_a_tensor_step_size():
    """A layer frozen after MAML(...) is still adapted (the set is fixed at construction) and gets no
    meta-gradient; a scalar step size that requires grad gets its meta-gradient. checkpoint_inner read
    requires_grad at call time (20-50% apart) and dropped the step size's gradient."""
    torch.manual_seed(33)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
    batch = make_batch()
    grads = {}
    for name, kwargs in [("loop", dict(strategy="loop")), ("vmap", dict(strategy="vmap")),
                         ("checkpoint_inner", dict(checkpoint_inner=True)), ("functional", dict(strategy="vmap"))]:
        copied = copy.deepcopy(model)
        maml = MAML(copied, inner_lr=0.1, inner_steps=2, **kwargs)
        copied[2].requires_grad_(False)  # frozen after construction
        maml.inner_lr = nn.Parameter(torch.tensor(0.3))  # a learned scalar step size
        tensors = [p for p in maml.parameters() if p.requires_grad]
        assert len(tensors) == 5
        if name == "functional":  # compile=True's single transform, without the compile time
            maml._functional_grad = True
            maml.zero_grad(set_to_none=True)
            maml.meta_backward(batch)
            assert copied[2].weight.grad is None
            grads[name] = [p.grad for p in tensors]
        else:
            grads[name] = meta_grad(maml, batch, tensors)
    want = finite_difference_grad(lambda: maml.meta_loss(batch), tensors)
    for name, got in grads.items():
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-8, msg=name)
    # adapt(..., lr=tensor, create_graph=True): the step size's gradient survives recomputation.
    x, y, qx, qy = (t[0] for t in batch)
    lr_grads = []
    for checkpoint_inner in (False, True):
        maml = MAML(copy.deepcopy(model), inner_lr=0.1, inner_steps=2, checkpoint_inner=checkpoint_inner)
        lr = torch.tensor(0.2, requires_grad=True)
        adapted = maml.adapt(x, y, lr=lr, create_graph=True)
        lr_grads.append(torch.autograd.grad(F.mse_loss(maml(qx, adapted), qy), lr)[0])
    torch.testing.assert_close(lr_grads[1], lr_grads[0], rtol=1e-12, atol=1e-14)
    assert lr_grads[0].abs() > 1e-3


# -- 6. adapt= patterns see every name of a shared submodule ------------------------------------------


class TwoNamedHead(nn.Module):
    """One Linear registered as ``head`` and as ``out``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(2, 6)
        self.head = nn.Linear(6, 1)
        self.out = self.head

    def forward(self, x):
        return self.out(torch.tanh(self.body(x)))


def test_adapt_patterns_match_a_shared_module_by_either_name():
    torch.manual_seed(34)
    model = TwoNamedHead()
    assert MAML(model, adapt=["out.*"]).adapted_names == ["head.weight", "head.bias"]
    assert MAML(model, adapt=["*", "!out.*"]).adapted_names == ["body.weight", "body.bias"]
    assert MAML(model, adapt=lambda n: n.startswith("out.")).adapted_names == ["head.weight", "head.bias"]
    assert MAML(model, adapt="out.*").adapted_names == ["head.weight", "head.bias"]  # one pattern, not five
    batch = make_batch()
    adapted = MAML(model, inner_lr=0.1, adapt=["out.*"]).adapt(batch.support_inputs[0], batch.support_targets[0])
    assert adapted["body.weight"] is model.body.weight and not torch.equal(adapted["head.weight"], model.head.weight)
    with pytest.raises(ValueError, match=r"\['outt\.\*'\] match no trainable parameter"):
        MAML(model, adapt=["body.*", "outt.*"])


# -- 7. the strategy is chosen with gradients on ------------------------------------------------------


class GRUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(2, 4, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.gru(x)[0])


def sequence_batch(tasks=2, k=3, q=2, length=4):
    g = torch.Generator().manual_seed(1)
    shapes = [(tasks, k, length, 2), (tasks, k, length, 1), (tasks, q, length, 2), (tasks, q, length, 1)]
    return TaskBatch(*(torch.randn(*s, generator=g) for s in shapes))


def test_a_first_meta_batch_under_no_grad_still_measures():
    """Under torch.no_grad() the timing runs failed for both strategies, auto fixed vmap unmeasured,
    and a GRU (no batching rule) then failed on every call."""
    torch.manual_seed(35)
    model = GRUNet()
    batch = sequence_batch()
    auto = MAML(model, inner_lr=0.1, strategy="auto")
    with torch.no_grad():
        got = auto.meta_loss(batch)
    assert auto.strategy == "loop" and auto.strategy_timings["vmap"] == float("inf")
    assert auto.strategy_timings["loop"] < float("inf")
    loop = MAML(model, inner_lr=0.1, strategy="loop")
    torch.testing.assert_close(got, loop.meta_loss(batch).detach())
    for g, w in zip(meta_grad(auto, batch), meta_grad(loop, batch)):
        torch.testing.assert_close(g, w)


# -- 8. auto says what it chose and why ----------------------------------------------------------------


class NormNet(nn.Module):
    def __init__(self, functional=False):
        super().__init__()
        self.functional = functional
        self.fc1 = nn.Linear(2, 6)
        self.norm = None if functional else nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 1)

    def forward(self, x):
        h = self.fc1(x)
        h = F.layer_norm(h, (6,)) if self.functional else self.norm(h)
        return self.fc2(torch.tanh(h))


def choices(caplog) -> list[str]:
    """The strategy choices logged (a measurement is announced in a line of its own)."""
    return [r.getMessage() for r in caplog.records if "chose" in r.getMessage()]


def test_auto_logs_its_choice_once(caplog):
    batch = make_batch()
    caplog.set_level(logging.INFO, logger="mamlkit")
    maml = MAML(NormNet(), inner_lr=0.1, strategy="auto")
    maml.meta_loss(batch)
    maml.meta_loss(batch)
    assert len(choices(caplog)) == 1 and all(r.name == "mamlkit" for r in caplog.records)
    msg = choices(caplog)[-1]
    for part in ("chose loop", "nn.LayerNorm at 'norm'", "first_order=True", "mamlkit.models.layers.BatchNorm"):
        assert part in msg, msg
    caplog.clear()
    MAML(NormNet(functional=True), inner_lr=0.1, strategy="auto").meta_loss(batch)
    msg = choices(caplog)[-1]
    assert "native_layer_norm" in msg and "NormNet" in msg and "first_order=True" in msg, msg
    caplog.clear()
    MAML(mlp(), inner_lr=0.1, strategy="auto").meta_loss(batch)
    msg = choices(caplog)[-1]
    assert "fastest meta-gradient" in msg and "vmap" in msg and "loop" in msg, msg
    caplog.clear()
    MAML(GRUNet(), inner_lr=0.1, strategy="auto").meta_loss(sequence_batch())
    msg = choices(caplog)[-1]
    assert "chose loop" in msg and "vmap failed" in msg, msg
    caplog.clear()
    MAML(mlp(), inner_lr=0.1, strategy="loop").meta_loss(batch)
    assert not caplog.records  # an explicit strategy is not a choice
