"""The engine's guards against wrong or lost computations (docs/traps.md), each checked in float64
against an independent computation: finite differences or a per-task loop."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import finite_difference_grad, float64  # noqa: F401  (float64: autouse)
from helpers import make_batch as _make_batch
from mamlkit import MAML, TaskBatch


def make_batch(tasks=3, k=8, q=8, **kw):
    return _make_batch(tasks, k, q, **kw)


def meta_grad(maml, batch):
    maml.zero_grad(set_to_none=True)
    maml.meta_loss(batch).backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in maml.parameters()]


def assert_close_all(got, want, **kw):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **kw)


# -- 1. the vmap guard looks at the operations a model calls, not its module types ------------------


class FunctionalNormNet(nn.Module):
    """Normalises with torch.nn.functional inside its own forward (as ConvNeXt-style code does): no
    normalisation module for a type check to find."""

    def __init__(self, norm: str):
        super().__init__()
        self.norm = norm
        self.fc1 = nn.Linear(2, 6)
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(6))
        self.shift = nn.Parameter(0.1 * torch.randn(6))
        self.fc2 = nn.Linear(6, 1)

    def forward(self, x):
        h = self.fc1(x)
        if self.norm == "layer_norm":
            h = F.layer_norm(h, (6,), self.scale, self.shift)
        else:
            h = F.batch_norm(h, None, None, self.scale, self.shift, training=True)
        return self.fc2(torch.tanh(h))


@pytest.mark.parametrize("norm", ["layer_norm", "batch_norm"])
def test_auto_uses_the_loop_for_functional_normalisation(norm):
    torch.manual_seed(20)
    model = FunctionalNormNet(norm)
    batch = make_batch()
    maml = MAML(model, inner_lr=0.1, inner_steps=2, strategy="auto")
    got = meta_grad(maml, batch)
    assert maml.strategy == "loop"
    assert maml.strategy_timings == {}  # vmap was never a candidate, so nothing was timed
    want = finite_difference_grad(lambda: maml.meta_loss(batch), list(maml.parameters()))
    assert_close_all(got, want, rtol=1e-6, atol=1e-8)
    # First order has no second derivative to get wrong: vmap stays a candidate there.
    fo = {s: MAML(model, inner_lr=0.1, inner_steps=2, first_order=True, strategy=s) for s in ("vmap", "loop")}
    assert_close_all(meta_grad(fo["vmap"], batch), meta_grad(fo["loop"], batch))


@pytest.mark.parametrize("norm, op", [("layer_norm", "native_layer_norm"), ("batch_norm", "native_batch_norm")])
def test_explicit_vmap_is_refused_for_functional_normalisation(norm, op):
    maml = MAML(FunctionalNormNet(norm), inner_lr=0.1, inner_steps=2, strategy="vmap")
    for _ in range(2):  # refused on every call, not only the first
        with pytest.raises(ValueError, match=op) as err:
            maml.meta_loss(make_batch())
    for fix in ("strategy='loop'", "first_order=True", "mamlkit.models.layers.BatchNorm"):
        assert fix in str(err.value)


def test_the_functional_layer_norm_trap_is_real():
    """Why the operation guard exists: forcing vmap past it gives a wrong second-order
    meta-gradient. If a torch upgrade makes this test fail, vmap has become exact through
    aten::native_layer_norm and the operation list in engine/strategies.py can shrink."""
    torch.manual_seed(20)
    batch = make_batch()
    maml = MAML(FunctionalNormNet("layer_norm"), inner_lr=0.1, inner_steps=2, strategy="loop")
    want = meta_grad(maml, batch)
    maml.strategy = "vmap"  # bypasses the guard, which runs on the first meta-batch only
    maml._strategy_chosen = True
    got = meta_grad(maml, batch)
    worst = max(((g - w).norm() / w.norm()).item() for g, w in zip(got, want))
    assert worst > 1e-4


def test_functional_normalisation_turns_the_single_transform_path_off():
    """compile=True's single torch.func.grad transform is given up where the operations make vmap
    inexact, as for the layer types the module guard finds."""
    torch.manual_seed(21)
    maml = MAML(FunctionalNormNet("layer_norm"), inner_lr=0.1, inner_steps=2, compile=True)
    assert maml._functional_grad  # no normalisation module to see before the first batch
    maml._compile = False  # the guard is what is tested, not the compiler
    batch = make_batch()
    maml.zero_grad(set_to_none=True)
    maml.meta_backward(batch)
    assert not maml._functional_grad and maml.strategy == "loop"
    got = [p.grad.clone() for p in maml.parameters()]
    want = finite_difference_grad(lambda: maml.meta_loss(batch), list(maml.parameters()))
    assert_close_all(got, want, rtol=1e-6, atol=1e-8)


# -- 2. a strategy is never used untested ----------------------------------------------------------


class GRUNet(nn.Module):
    """A recurrent model: vmap has no batching rule for aten::gru. Dropout before the GRU draws
    random numbers before vmap fails."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.gru = nn.GRU(2, 5, batch_first=True)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        out, _ = self.gru(self.drop(x))
        return self.head(out)


def sequence_batch(tasks=3, k=4, q=3, length=5):
    g = torch.Generator().manual_seed(1)
    return TaskBatch(
        torch.randn(tasks, k, length, 2, generator=g),
        torch.randn(tasks, k, length, 1, generator=g),
        torch.randn(tasks, q, length, 2, generator=g),
        torch.randn(tasks, q, length, 1, generator=g),
    )


def test_adaptation_curve_before_training_never_runs_vmap_untested():
    torch.manual_seed(22)
    model = GRUNet()
    batch = sequence_batch()
    auto = MAML(model, inner_lr=0.1, strategy="auto")
    torch.manual_seed(0)
    got = auto.adaptation_curve(batch, steps=2)["loss"]
    torch.manual_seed(0)
    want = MAML(model, inner_lr=0.1, strategy="loop").adaptation_curve(batch, steps=2)["loss"]
    torch.testing.assert_close(got, want)  # the same numbers, the same random draws
    assert got.shape == (3, 3)
    # Training still measures its own choice on its first meta-batch (vmap fails there too).
    auto.meta_loss(batch)
    assert auto.strategy == "loop" and auto.strategy_timings["vmap"] == float("inf")


# -- 3. Meta-SGD: one learned step size per parameter, under names that never collide --------------


class CollidingNames(nn.Module):
    """``a__weight`` and ``a.weight``: the old step-size key of both was ``a__weight``."""

    def __init__(self):
        super().__init__()
        self.a__weight = nn.Parameter(1 + 0.1 * torch.randn(3))
        self.a = nn.Linear(2, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x) * self.a__weight))


def randomise_step_sizes(maml, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lr in maml.inner_lrs.values():
            lr.copy_(0.05 + 0.1 * torch.rand(lr.shape, generator=g))


def test_meta_sgd_gives_every_parameter_its_own_step_size():
    torch.manual_seed(23)
    maml = MAML(CollidingNames(), inner_lr=0.1, inner_steps=2, learn_inner_lr=True, strategy="loop")
    params = maml.params()
    assert len(maml.inner_lrs) == len(params) == 5
    assert sorted(lr.shape for lr in maml.inner_lrs.values()) == sorted(p.shape for p in params.values())
    randomise_step_sizes(maml, 0)
    batch = make_batch()
    got = meta_grad(maml, batch)
    want = finite_difference_grad(lambda: maml.meta_loss(batch), list(maml.parameters()))
    assert_close_all(got, want, rtol=1e-6, atol=1e-8)


def test_step_size_keys_are_one_to_one():
    from itertools import product

    from mamlkit.engine.maml import _key

    names = ["".join(c) for n in range(1, 6) for c in product("a_.", repeat=n)]
    names = [n for n in names if not n.startswith(".") and not n.endswith(".") and ".." not in n]
    keys = [_key(n) for n in names]
    assert len(set(keys)) == len(names) and not any("." in k for k in keys)
    assert _key("blocks.0.conv_1.weight") == "blocks__0__conv_1__weight"  # ordinary names keep their key


class UnusualName(nn.Module):
    """One parameter whose name holds ``__``: it collides with nothing, so its old key worked."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 3)
        self.gain__0 = nn.Parameter(torch.ones(3))
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)) * self.gain__0)


@pytest.mark.parametrize(
    "make", [lambda: nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)), UnusualName], ids=["mlp", "unusual"]
)
def test_meta_sgd_checkpoints_in_the_old_format_still_load(make):
    from mamlkit.engine.maml import _key

    torch.manual_seed(24)
    saved = MAML(make(), inner_lr=0.1, learn_inner_lr=True)
    randomise_step_sizes(saved, 1)
    # The state dict as mamlkit wrote it before: step sizes under the parameter name with '.' -> '__'.
    old = {k: v for k, v in saved.state_dict().items() if not k.startswith("inner_lrs.")}
    for n in saved.params():
        old["inner_lrs." + n.replace(".", "__")] = saved.inner_lrs[_key(n)].detach().clone()
    torch.manual_seed(25)
    loaded = MAML(make(), inner_lr=0.1, learn_inner_lr=True)
    loaded.load_state_dict(old)
    batch = make_batch()
    x, y = batch.support_inputs[0], batch.support_targets[0]
    want, got = saved.adapt(x, y, steps=2), loaded.adapt(x, y, steps=2)
    assert want.keys() == got.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)


# -- 4. checkpoint_inner recomputes each inner step once --------------------------------------------


class CountedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(2, 8)
        self.fc2 = nn.Linear(8, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("learn_inner_lr", [False, True], ids=["maml", "meta-sgd"])
def test_checkpointed_inner_step_runs_its_forward_twice(learn_inner_lr):
    """Per task, the forward pass runs each of the 2 support forwards and the query forward once
    (3), and the backward pass recomputes each support forward once (2): 5 per task, 15 for 3
    tasks. The stored-graph MAML runs 3 per task, 9 in all. (The first meta-batch of each also
    runs one support forward to record the model's operations, before the counting.)"""
    torch.manual_seed(26)
    tasks, steps = 3, 2
    batch = make_batch(tasks=tasks)
    model = CountedMLP()
    stored = MAML(model, inner_lr=0.1, inner_steps=steps, strategy="loop", learn_inner_lr=learn_inner_lr)
    maml = MAML(model, inner_lr=0.1, inner_steps=steps, checkpoint_inner=True, learn_inner_lr=learn_inner_lr)
    if learn_inner_lr:
        randomise_step_sizes(stored, 2)
        maml.inner_lrs.load_state_dict(stored.inner_lrs.state_dict())
    stored.zero_grad(set_to_none=True)
    stored.meta_backward(batch)
    want = [p.grad.clone() for p in stored.parameters()]
    maml.meta_loss(batch)  # records the model's operations, once
    model.calls = 0
    stored.meta_loss(batch)
    assert model.calls == tasks * (steps + 1)
    model.calls = 0
    maml.meta_loss(batch)
    assert model.calls == tasks * (steps + 1)  # the forward pass recomputes nothing
    model.calls = 0
    maml.zero_grad(set_to_none=True)
    maml.meta_backward(batch)
    assert model.calls == tasks * (steps + 1) + tasks * steps
    assert_close_all([p.grad for p in maml.parameters()], want, rtol=1e-12, atol=1e-14)


def test_checkpointed_inner_step_recomputes_the_same_dropout():
    """The recomputation replays the random numbers of the forward pass, and leaves the stream
    where the stored-graph MAML leaves it."""
    torch.manual_seed(27)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 1))
    batch = make_batch()
    grads, states = [], []
    for checkpoint in (False, True):
        maml = MAML(model, inner_lr=0.1, inner_steps=2, strategy="loop", checkpoint_inner=checkpoint)
        torch.manual_seed(0)
        grads.append(meta_grad(maml, batch))
        states.append(torch.get_rng_state())
    assert_close_all(grads[1], grads[0], rtol=1e-12, atol=1e-14)
    assert torch.equal(states[0], states[1])


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(learn_inner_lr=True), dict(adapt=["2.*"])], ids=["maml", "meta-sgd", "head-only"]
)
def test_checkpointed_inner_step_can_be_differentiated_twice(kwargs):
    """A Hessian-vector product of the meta-loss through recomputed steps equals the stored graph's
    (the step size, and parameters the inner loop leaves alone, feed every step)."""
    torch.manual_seed(28)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    batch = make_batch()
    hvps = []
    for checkpoint in (False, True):
        maml = MAML(model, inner_lr=0.1, inner_steps=2, strategy="loop", checkpoint_inner=checkpoint, **kwargs)
        if "learn_inner_lr" in kwargs:
            randomise_step_sizes(maml, 3)
        params = list(maml.parameters())
        grads = torch.autograd.grad(maml.meta_loss(batch), params, create_graph=True)
        g = torch.Generator().manual_seed(4)
        v = [torch.randn(p.shape, generator=g) for p in params]
        hvps.append(torch.autograd.grad(sum((a * b).sum() for a, b in zip(grads, v)), params))
    assert_close_all(hvps[1], hvps[0], rtol=1e-12, atol=1e-14)
