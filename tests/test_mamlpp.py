"""MAML++'s options (Antoniou et al., ICLR 2019) and the BatchNorm modes: each meta-gradient against
an independent computation in float64 (central finite differences, or MAML written by hand with
torch.autograd), the schedules against their definitions, resume, refusals and the presets."""

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import finite_difference_grad, float64, make_batch  # noqa: F401  (float64: autouse)
from mamlkit import MAML, cli, config
from mamlkit.engine.mamlpp import check_options, cosine_lr, msl_weights
from mamlkit.engine.norm import InductiveBatchNorm, PerStepBatchNorm
from mamlkit.engine.step_sizes import _key
from mamlkit.experiments import fewshot, load_config
from mamlkit.models import BatchNorm, mlp
from mamlkit.training import AdamUpdate, Trainer


def grads_of(maml, batch):
    maml.zero_grad(set_to_none=True)
    maml.meta_loss(batch).backward()
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in maml.parameters()]


def assert_matches_fd(maml, batch, rtol=1e-6, atol=1e-8):
    got = grads_of(maml, batch)
    want = finite_difference_grad(lambda: maml.meta_loss(batch), list(maml.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


def by_hand(model, batch, size, steps, weights=None, first_order=False, query_loss=F.mse_loss):
    """MAML written directly with torch.autograd, one task at a time, every parameter adapted:
    ``size(name, k)`` is step k's step size of a parameter; ``weights``: the multi-step loss's."""
    base = dict(model.named_parameters())
    losses = []
    for si, st, qi, qt in zip(*batch):
        fast, total = dict(base), 0.0
        for k in range(steps):
            loss = F.mse_loss(torch.func.functional_call(model, fast, (si,)), st)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: p - size(n, k) * g for (n, p), g in zip(fast.items(), grads)}
            if weights is not None:
                total = total + weights[k] * query_loss(torch.func.functional_call(model, fast, (qi,)), qt)
        if weights is None:
            total = query_loss(torch.func.functional_call(model, fast, (qi,)), qt)
        losses.append(total)
    return torch.stack(losses).mean()


def tiny():
    return mlp(2, [6], 1, nn.Tanh)


# -- the multi-step loss ---------------------------------------------------------------------------


def test_msl_weights_follow_their_definition():
    for n in (1, 2, 5):
        for annealing in (1, 7, 100):
            assert msl_weights(n, 0, annealing) == pytest.approx([1 / n] * n)  # uniform at the start
            for i in range(annealing + 3):
                w = msl_weights(n, i, annealing)
                if i >= annealing:  # MAML++ stops the multi-step loss: the final step's loss alone
                    assert w is None
                    continue
                decay = 1 / n / annealing
                want = [max(1 / n - i * decay, 0.03 / n) for _ in range(n - 1)]
                want.append(min(1 / n + i * (n - 1) * decay, 1 - (n - 1) * 0.03 / n))
                assert w == pytest.approx(want, abs=1e-15)
                assert sum(w) == pytest.approx(1.0, abs=1e-12)
                assert all(x >= 0.03 / n - 1e-15 for x in w[:-1]) and w[-1] <= 1 - (n - 1) * 0.03 / n + 1e-15
        assert msl_weights(n, 10**6, 0) == pytest.approx([1 / n] * n)  # no annealing: uniform throughout
    floor = msl_weights(5, 99, 100)  # past 0.97 of the annealing: the floors and the cap
    assert floor == pytest.approx([0.006] * 4 + [0.976])


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("steps", [1, 3])
def test_multi_step_loss_meta_gradient_matches_finite_differences_and_by_hand(strategy, steps):
    torch.manual_seed(0)
    maml = MAML(tiny(), inner_lr=0.1, inner_steps=steps, multi_step_loss=True, msl_iterations=10, strategy=strategy)
    maml.set_iteration(4)
    batch = make_batch()
    w = msl_weights(steps, 4, 10)
    assert maml.msl_weights() == w
    want = by_hand(maml.model, batch, lambda n, k: 0.1, steps, weights=w)
    torch.testing.assert_close(maml.meta_loss(batch), want)
    ref = torch.autograd.grad(want, list(maml.model.parameters()))
    for g, r in zip(grads_of(maml, batch), ref):
        torch.testing.assert_close(g, r)
    assert_matches_fd(maml, batch)


def test_multi_step_loss_ends_as_the_final_loss_and_one_step_is_plain_maml():
    torch.manual_seed(1)
    batch = make_batch()
    model = tiny()
    plain = MAML(model, inner_lr=0.1, inner_steps=2)
    msl = MAML(model, inner_lr=0.1, inner_steps=2, multi_step_loss=True, msl_iterations=5)
    msl.set_iteration(5)  # annealed: the final step's query loss alone, as plain MAML
    assert msl.msl_weights() is None
    torch.testing.assert_close(msl.meta_loss(batch), plain.meta_loss(batch), rtol=0, atol=0)
    one = MAML(model, inner_lr=0.1, inner_steps=1, multi_step_loss=True)
    torch.testing.assert_close(one.meta_loss(batch), MAML(model, inner_lr=0.1).meta_loss(batch))


# -- LSLR --------------------------------------------------------------------------------------------


def lslr_maml(steps, strategy="loop", **kw):
    torch.manual_seed(2)
    maml = MAML(tiny(), inner_lr=0.1, inner_steps=steps, lslr=True, strategy=strategy, **kw)
    with torch.no_grad():  # distinct sizes per tensor and step, so that a mix-up shows
        for i, v in enumerate(maml.step_lrs.values()):
            v.copy_(0.05 + 0.02 * i + 0.03 * torch.arange(steps))
    return maml


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("steps", [1, 3])
def test_lslr_meta_gradient_matches_finite_differences_and_by_hand(strategy, steps):
    maml = lslr_maml(steps, strategy)
    assert [tuple(v.shape) for v in maml.step_lrs.values()] == [(steps,)] * 4  # one per tensor and step
    batch = make_batch()
    want = by_hand(maml.model, batch, lambda n, k: maml.step_lrs[_key(n)][k], steps)
    torch.testing.assert_close(maml.meta_loss(batch), want)
    for g, r in zip(grads_of(maml, batch), torch.autograd.grad(want, list(maml.parameters()))):
        torch.testing.assert_close(g, r)
    assert_matches_fd(maml, batch)
    assert all(v.grad is not None and v.grad.abs().min() > 0 for v in maml.step_lrs.values())


def test_lslr_sizes_are_saved_resumed_and_reused_beyond_the_trained_steps():
    maml = lslr_maml(2)
    state = maml.state_dict()
    assert sum(k.startswith("step_lrs.") for k in state) == 4
    other = MAML(tiny(), inner_lr=0.3, inner_steps=2, lslr=True)
    other.load_state_dict(state)
    for a, b in zip(maml.step_lrs.values(), other.step_lrs.values()):
        assert torch.equal(a, b)
    # At evaluation, steps beyond the trained ones reuse the last step's sizes.
    x, y = make_batch()[:2]
    fast = other.adapt(x[0], y[0], steps=4)
    want = dict(other.model.named_parameters())
    for k in range(4):
        loss = F.mse_loss(torch.func.functional_call(other.model, want, (x[0],)), y[0])
        grads = torch.autograd.grad(loss, list(want.values()))
        want = {n: p - other.step_lrs[_key(n)][min(k, 1)] * g for (n, p), g in zip(want.items(), grads)}
    for n in want:
        torch.testing.assert_close(fast[n], want[n])


# -- derivative-order annealing ----------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_derivative_order_annealing_is_first_order_then_second_order(strategy):
    torch.manual_seed(3)
    model = tiny()
    batch = make_batch()
    annealed = MAML(model, inner_lr=0.2, inner_steps=2, first_order_iterations=3, strategy=strategy)
    first = grads_of(MAML(model, inner_lr=0.2, inner_steps=2, first_order=True, strategy=strategy), batch)
    second = grads_of(MAML(model, inner_lr=0.2, inner_steps=2, strategy=strategy), batch)
    for i, want in ((0, first), (2, first), (3, second), (10, second)):
        annealed.set_iteration(i)
        for g, w in zip(grads_of(annealed, batch), want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    # The second-order phase is the true meta-gradient.
    ref = torch.autograd.grad(by_hand(model, batch, lambda n, k: 0.2, 2), list(model.parameters()))
    for g, r in zip(grads_of(annealed, batch), ref):
        torch.testing.assert_close(g, r)


def test_first_order_set_after_construction_still_takes_effect():
    """With the options off, ``create_graph`` reads ``first_order`` at each call, as before them."""
    torch.manual_seed(3)
    model = tiny()
    batch = make_batch()
    maml = MAML(model, inner_lr=0.2, inner_steps=2)
    maml.first_order = True
    fomaml = by_hand(model, batch, lambda n, k: 0.2, 2, first_order=True)
    for g, w in zip(grads_of(maml, batch), torch.autograd.grad(fomaml, list(model.parameters()))):
        torch.testing.assert_close(g, w)


def test_auto_measures_the_strategies_again_at_the_switch():
    torch.manual_seed(4)
    maml = MAML(tiny(), inner_lr=0.1, inner_steps=1, first_order_iterations=2, strategy="auto")
    batch = make_batch(tasks=4)
    maml.meta_loss(batch)
    assert maml._strategy_chosen and maml.strategy in ("loop", "vmap")
    maml.set_iteration(1)
    assert maml._strategy_chosen  # the same order: the choice stands
    maml.set_iteration(2)
    assert not maml._strategy_chosen  # second order from here: measured again on the next batch
    maml.meta_loss(batch)
    assert maml._strategy_chosen and set(maml.strategy_timings) == {"loop", "vmap"}


# -- cosine outer step size ---------------------------------------------------------------------------


def test_cosine_schedule_and_adam_update_follow_the_iteration():
    assert cosine_lr(1e-3, 1e-5, 0, 100) == 1e-3
    assert cosine_lr(1e-3, 1e-5, 100, 100) == pytest.approx(1e-5)
    assert cosine_lr(1e-3, 1e-5, 50, 100) == pytest.approx((1e-3 + 1e-5) / 2)
    values = [cosine_lr(1e-3, 0.0, i, 100) for i in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert cosine_lr(1e-3, 0.0, 25, 100) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)
    maml = MAML(tiny(), inner_lr=0.1, multi_step_loss=True, inner_steps=2, msl_iterations=5)
    update = AdamUpdate(maml, lambda g: make_batch(), 1e-3, lr_schedule="cosine", min_lr=1e-5, iterations=40)
    update.set_iteration(20)
    assert update.optimizer.param_groups[0]["lr"] == cosine_lr(1e-3, 1e-5, 20, 40) and maml.iteration == 20
    constant = AdamUpdate(maml, lambda g: make_batch(), 1e-3)
    constant.set_iteration(20)
    assert constant.optimizer.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="give iterations"):
        AdamUpdate(maml, lambda g: make_batch(), 1e-3, lr_schedule="cosine")


def train_args(out, *sets):
    common = [
        "models=[maml]",
        "maml.compile=false",
        "maml.strategy=loop",
        "maml.inner_steps=2",
        "maml.multi_step_loss=true",
        "maml.msl_iterations=12",
        "maml.lslr=true",
        "maml.first_order_iterations=9",
        "train.lr_schedule=cosine",
        "train.min_meta_lr=1e-4",
        "train.meta_lr=0.01",
        "train.iterations=24",
        "train.meta_batch_size=4",
        "train.log_every=6",
        "train.checkpoint_every=6",
        "train.threads=1",
    ]
    return ["train", "sinusoid", "--out", str(out), "--quiet", *[a for s in (*common, *sets) for a in ("--set", s)]]


def test_cosine_and_mamlpp_options_resume_bit_identically_through_the_cli(tmp_path, capsys):
    """A run stopped after its first iteration and resumed ends with the parameters (step sizes
    included) and Adam state of an uninterrupted run: the outer step size, the multi-step loss and
    the derivative order are functions of the iteration."""
    assert cli.main(train_args(tmp_path / "straight")) == 0
    assert cli.main(train_args(tmp_path / "stopped", "train.time_limit=1e-9")) == 130  # stopped, resumable
    first = torch.load(tmp_path / "stopped/maml/checkpoint.pt", weights_only=False)
    assert first["iteration"] < 24
    assert cli.main([*train_args(tmp_path / "stopped", "train.time_limit=0"), "--resume"]) == 0
    a = torch.load(tmp_path / "straight/maml/checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "stopped/maml/checkpoint.pt", weights_only=False)
    assert a["iteration"] == b["iteration"] == 24
    assert any(k.startswith("step_lrs.") for k in a["learner"])
    for k in a["learner"]:
        assert torch.equal(a["learner"][k], b["learner"][k]), k
    assert a["update"]["param_groups"][0]["lr"] == b["update"]["param_groups"][0]["lr"] == cosine_lr(0.01, 1e-4, 23, 24)
    with open(tmp_path / "stopped/maml/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["meta_lr"]) <= 0.01 and float(rows[-1]["meta_lr"]) < float(rows[0]["meta_lr"])
    # The schedule's length is what train.iterations says: a resume may not change it.
    capsys.readouterr()
    assert cli.main([*train_args(tmp_path / "stopped", "train.iterations=30"), "--resume"]) == 2
    assert "cosine" in capsys.readouterr().err


def test_trainer_gives_the_iteration_before_each_step(tmp_path):
    seen = []
    maml = MAML(tiny(), inner_lr=0.1)
    update = AdamUpdate(maml, lambda g: make_batch(), 1e-3)
    real = update.set_iteration
    update.set_iteration = lambda i: seen.append(i) or real(i)
    Trainer(tmp_path, maml, update, torch.Generator(), iterations=5, checkpoint_every=5, log_every=5).fit(
        progress=False
    )
    assert seen == [0, 1, 2, 3, 4]


# -- BatchNorm modes -------------------------------------------------------------------------------


class BNNet(nn.Module):
    def __init__(self, norm=None):
        super().__init__()
        self.fc1 = nn.Linear(2, 5)
        self.norm = norm if norm is not None else BatchNorm(5, affine="both")
        self.fc2 = nn.Linear(5, 1)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def per_step_maml(steps, strategy="loop", **kw):
    torch.manual_seed(5)
    maml = MAML(BNNet(), inner_lr=0.1, inner_steps=steps, norm="per_step", strategy=strategy, **kw)
    with torch.no_grad():  # rows that differ, so that using the wrong one shows
        maml.model.norm.weight.add_(0.3 * torch.randn_like(maml.model.norm.weight))
        maml.model.norm.bias.add_(0.3 * torch.randn_like(maml.model.norm.bias))
    return maml


def test_per_step_norm_uses_step_ks_row_at_step_k():
    maml = per_step_maml(3, adapt=["fc*"])
    norm = maml.model.norm
    assert isinstance(norm, PerStepBatchNorm) and tuple(norm.weight.shape) == (3, 5)
    x = make_batch().support_inputs[0]
    params = maml.params()
    before = [maml._model_at(k)(params, x) for k in range(3)]
    with torch.no_grad():
        norm.weight[1] += 0.5
    after = [maml._model_at(k)(params, x) for k in range(3)]
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.allclose(before[1], after[1])
    # Through the inner loop: row 1 is step 1's support forward and the query after 2 steps, so the
    # queries after 0 and 1 steps are untouched and those after 2 and 3 steps change.
    batch = make_batch()
    with torch.no_grad():
        norm.weight[1] -= 0.5
    curve = maml.adaptation_curve(batch, 3)["loss"]
    with torch.no_grad():
        norm.weight[1] += 0.5
    moved = maml.adaptation_curve(batch, 3)["loss"]
    assert torch.equal(curve[:, :2], moved[:, :2])
    assert (curve[:, 2:] - moved[:, 2:]).abs().min() > 0
    # Beyond the trained steps the last row is reused: step index 5 is row 2.
    assert torch.equal(maml._model_at(5)(params, x), maml._model_at(2)(params, x))


def by_hand_per_step(maml, batch, steps, weights=None, size=lambda n, k: 0.1):
    """Per-step BatchNorm MAML by hand: the network written out, row k of the norm at step k's
    support forward and at the query after it; ``weights``: the multi-step loss's; ``size(name, k)``:
    step k's step size of a parameter."""
    p0 = dict(maml.model.named_parameters())
    adapted = [n for n in p0 if n.startswith("fc")]

    def net(p, x, k):
        h = x @ p["fc1.weight"].T + p["fc1.bias"]
        mean = h.mean(0, keepdim=True)
        var = ((h - mean) ** 2).mean(0, keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-5) * p["norm.weight"][k] + p["norm.bias"][k]
        return torch.tanh(h) @ p["fc2.weight"].T + p["fc2.bias"]

    losses = []
    for si, st, qi, qt in zip(*batch):
        fast, total = dict(p0), 0.0
        for k in range(steps):
            loss = F.mse_loss(net(fast, si, k), st)
            grads = torch.autograd.grad(loss, [fast[n] for n in adapted], create_graph=True)
            fast = {**fast, **{n: fast[n] - size(n, k) * g for n, g in zip(adapted, grads)}}
            if weights is not None:
                total = total + weights[k] * F.mse_loss(net(fast, qi, k), qt)
        if weights is None:
            total = F.mse_loss(net(fast, qi, steps - 1), qt)
        losses.append(total)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("steps", [1, 2])
def test_per_step_norm_meta_gradient_matches_finite_differences_and_by_hand(strategy, steps):
    maml = per_step_maml(steps, strategy, adapt=["fc*"])
    batch = make_batch()
    want = by_hand_per_step(maml, batch, steps)
    torch.testing.assert_close(maml.meta_loss(batch), want)
    for g, r in zip(grads_of(maml, batch), torch.autograd.grad(want, list(maml.parameters()))):
        torch.testing.assert_close(g, r)
    assert_matches_fd(maml, batch)


@pytest.mark.parametrize("strategy, checkpoint_inner", [("loop", False), ("vmap", False), ("loop", True)])
def test_per_step_norm_with_msl_and_lslr_matches_by_hand(strategy, checkpoint_inner):
    """The multi-step loss's query after step k uses row k, as that step's support forward did."""
    batch = make_batch()
    kw = {"adapt": ["fc*"], "multi_step_loss": True, "msl_iterations": 4, "lslr": True}
    maml = per_step_maml(3, strategy, checkpoint_inner=checkpoint_inner, **kw)
    with torch.no_grad():  # distinct sizes per tensor and step
        for i, v in enumerate(maml.step_lrs.values()):
            v.copy_(0.05 + 0.02 * i + 0.03 * torch.arange(3))
    maml.set_iteration(1)
    w = msl_weights(3, 1, 4)
    assert len(set(w)) == 2  # not uniform: a weight given to the wrong step shows
    want = by_hand_per_step(maml, batch, 3, weights=w, size=lambda n, k: maml.step_lrs[_key(n)][k])
    torch.testing.assert_close(maml.meta_loss(batch), want)
    for g, r in zip(grads_of(maml, batch), torch.autograd.grad(want, list(maml.parameters()))):
        torch.testing.assert_close(g, r)


@pytest.mark.slow
def test_compiled_mamlpp_options_match_the_eager_loop():
    """torch.compile (the single torch.func transform) with the multi-step loss, LSLR, per-step
    BatchNorm and derivative-order annealing, on both sides of the switch."""
    batch = make_batch()
    kw = {"adapt": ["fc*"], "multi_step_loss": True, "msl_iterations": 4, "lslr": True, "first_order_iterations": 2}
    eager = per_step_maml(2, "loop", **kw)
    compiled = per_step_maml(2, "vmap", compile=True, **kw)
    for i in (1, 2, 5):
        for m in (eager, compiled):
            m.set_iteration(i)
            m.zero_grad(set_to_none=True)
            m.meta_backward(batch)
        for a, b in zip(eager.parameters(), compiled.parameters()):
            torch.testing.assert_close(a.grad, b.grad)


def test_inductive_norm_accumulates_training_query_statistics_and_normalises_test_queries_with_them():
    torch.manual_seed(6)
    maml = MAML(BNNet(), inner_lr=0.1, inner_steps=1, norm="inductive", adapt=["fc*"])
    norm = maml.model.norm
    assert isinstance(norm, InductiveBatchNorm) and maml.strategy == "loop"
    batch = make_batch(tasks=1)
    si, st, qi, qt = (t[0] for t in batch)
    fast = maml.adapt(si, st)  # support: batch statistics, nothing accumulated
    assert torch.equal(norm.running_mean, torch.zeros(5)) and torch.equal(norm.running_var, torch.ones(5))
    maml.meta_loss(batch)  # training: the query after adaptation updates the running statistics
    h = qi @ fast["fc1.weight"].T + fast["fc1.bias"]
    torch.testing.assert_close(norm.running_mean, 0.1 * h.mean(0).detach())
    torch.testing.assert_close(norm.running_var, 0.9 + 0.1 * h.var(0, unbiased=True).detach())
    # Evaluation: the query normalised with the running statistics, one example as in a batch.
    out = maml(qi, fast)
    y = (h - norm.running_mean) / torch.sqrt(norm.running_var + 1e-5) * fast["norm.weight"] + fast["norm.bias"]
    torch.testing.assert_close(out, torch.tanh(y) @ fast["fc2.weight"].T + fast["fc2.bias"])
    torch.testing.assert_close(maml(qi[:1], fast), out[:1])
    curve = maml.adaptation_curve(batch, 1)["loss"]
    torch.testing.assert_close(curve[0, 1], F.mse_loss(out, qt))
    assert "running_mean" in "".join(maml.state_dict())  # saved with the weights, so a resume keeps them


@pytest.mark.parametrize("steps", [1, 2])
def test_inductive_norm_meta_gradient_matches_finite_differences(steps):
    torch.manual_seed(7)
    maml = MAML(BNNet(), inner_lr=0.1, inner_steps=steps, norm="inductive", adapt=["fc*"])
    assert_matches_fd(maml, make_batch())


def test_inductive_norm_with_msl_matches_by_hand_at_training_and_evaluation():
    """Training: batch statistics everywhere, running statistics accumulated from each task's
    adapted query (the final step's, not the multi-step loss's earlier ones). Evaluation: the
    support with its batch's statistics, the query with the running ones."""
    torch.manual_seed(9)
    kw = {"adapt": ["fc*"], "multi_step_loss": True, "msl_iterations": 4}
    maml = MAML(BNNet(), inner_lr=0.1, inner_steps=2, norm="inductive", **kw)
    maml.set_iteration(1)
    batch = make_batch()
    p0 = dict(maml.model.named_parameters())
    adapted = [n for n in p0 if n.startswith("fc")]

    def net(p, x, stats=None):
        h = x @ p["fc1.weight"].T + p["fc1.bias"]
        mean, var = stats if stats is not None else (h.mean(0), h.var(0, unbiased=False))
        y = (h - mean) / torch.sqrt(var + 1e-5) * p["norm.weight"] + p["norm.bias"]
        return torch.tanh(y) @ p["fc2.weight"].T + p["fc2.bias"], h

    def trail(si, st):
        fast, out = dict(p0), [dict(p0)]
        for _ in range(2):
            grads = torch.autograd.grad(F.mse_loss(net(fast, si)[0], st), [fast[n] for n in adapted], create_graph=True)
            fast = {**fast, **{n: fast[n] - 0.1 * g for n, g in zip(adapted, grads)}}
            out.append(fast)
        return out

    w = msl_weights(2, 1, 4)
    mean, var = torch.zeros(5), torch.ones(5)
    losses = []
    for si, st, qi, qt in zip(*batch):
        ps = trail(si, st)
        losses.append(sum(w[k] * F.mse_loss(net(ps[k + 1], qi)[0], qt) for k in range(2)))
        h = net(ps[-1], qi)[1].detach()
        mean, var = 0.9 * mean + 0.1 * h.mean(0), 0.9 * var + 0.1 * h.var(0, unbiased=True)
    want = torch.stack(losses).mean()
    maml.zero_grad(set_to_none=True)
    got = maml.meta_loss(batch)  # once: each call accumulates
    got.backward()
    torch.testing.assert_close(got, want)
    for p, r in zip(maml.parameters(), torch.autograd.grad(want, list(maml.parameters()))):
        torch.testing.assert_close(p.grad, r)
    torch.testing.assert_close(maml.model.norm.running_mean, mean)
    torch.testing.assert_close(maml.model.norm.running_var, var)
    curve = maml.adaptation_curve(batch, 2)["loss"]
    for t, (si, st, qi, qt) in enumerate(zip(*batch)):
        for s, p in enumerate(trail(si, st)):
            torch.testing.assert_close(curve[t, s], F.mse_loss(net(p, qi, (mean, var))[0], qt))


def test_inductive_norm_with_checkpoint_inner_equals_the_loop():
    batch = make_batch()
    learners = []
    for checkpoint_inner in (False, True):
        torch.manual_seed(8)
        learners.append(MAML(BNNet(), inner_lr=0.1, inner_steps=2, norm="inductive", checkpoint_inner=checkpoint_inner))
    loop, ckpt = learners
    for a, b in zip(grads_of(loop, batch), grads_of(ckpt, batch)):
        torch.testing.assert_close(a, b)
    # The recomputation in the backward pass accumulates nothing more.
    torch.testing.assert_close(loop.model.norm.running_mean, ckpt.model.norm.running_mean)
    torch.testing.assert_close(loop.model.norm.running_var, ckpt.model.norm.running_var)


def test_torch_batch_norm_is_converted_and_no_norm_is_refused():
    torch.manual_seed(10)
    net = BNNet(nn.BatchNorm1d(5, eps=1e-3))
    with torch.no_grad():  # an affine transform and eps that a conversion dropping them would show
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.normal_()
    x = make_batch().support_inputs[0]
    want = net(x)  # training mode: batch statistics, as every row of the converted layer
    maml = MAML(net, inner_lr=0.1, inner_steps=2, norm="per_step", strategy="vmap")
    assert isinstance(maml.model.norm, PerStepBatchNorm)  # plain tensor ops: exact under vmap
    for k in range(2):
        torch.testing.assert_close(maml._model_at(k)(maml.params(), x), want)
    assert_matches_fd(maml, make_batch())
    with pytest.raises(ValueError, match="found no batch normalisation layer"):
        MAML(tiny(), norm="per_step")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lslr": True, "learn_inner_lr": True}, "choose one"),
        ({"lslr": True, "inner_steps": 0}, "needs inner_steps >= 1"),
        ({"multi_step_loss": True, "inner_steps": 0}, "needs inner_steps >= 1"),
        ({"msl_iterations": 5}, "set multi_step_loss=True"),
        ({"first_order_iterations": 5, "first_order": True}, "set first_order=False"),
        ({"norm": "inductive", "strategy": "vmap"}, "use strategy='loop' or 'auto'"),
        ({"norm": "inductive", "compile": True}, "compile=False"),
        ({"norm": "sideways"}, "norm must be one of"),
    ],
)
def test_combinations_no_path_computes_are_refused_with_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        check_options(**options)
    with pytest.raises(ValueError, match=message):
        MAML(BNNet(), **options)
    if options.get("norm") == "sideways":
        return  # the config refuses it as any value outside maml.norm's choices
    sets = [f"maml.{k}={json.dumps(v)}" for k, v in options.items()]
    with pytest.raises(config.ConfigError, match=message.split("'")[0]):
        load_config("omniglot-5way-1shot", sets)


def test_config_refuses_norm_modes_for_the_sinusoid_and_a_min_lr_above_the_lr():
    with pytest.raises(config.ConfigError, match="no BatchNorm"):
        load_config("sinusoid", ["maml.norm=per_step"])
    with pytest.raises(config.ConfigError, match="min_meta_lr"):
        load_config("sinusoid", ["train.lr_schedule=cosine", "train.min_meta_lr=1"])


def test_inductive_norm_is_refused_under_torchrun(monkeypatch):
    from mamlkit import distributed

    monkeypatch.setattr(distributed, "active", lambda: True)
    maml = MAML(BNNet(), inner_lr=0.1, norm="inductive")
    with pytest.raises(ValueError, match="torchrun"):
        AdamUpdate(maml, lambda g: make_batch(), 1e-3)


# -- presets -------------------------------------------------------------------------------------


PRESETS = {
    "omniglot-5way-1shot-mamlpp": "omniglot-5way-1shot",
    "omniglot-20way-1shot-mamlpp": "omniglot-20way-1shot",
    "miniimagenet-5way-1shot-mamlpp": "miniimagenet-5way-1shot",
    "miniimagenet-5way-5shot-mamlpp": "miniimagenet-5way-5shot",
    "omniglot-5way-1shot-anil": "omniglot-5way-1shot",
    "omniglot-20way-1shot-anil": "omniglot-20way-1shot",
    "miniimagenet-5way-1shot-anil": "miniimagenet-5way-1shot",
    "miniimagenet-5way-5shot-anil": "miniimagenet-5way-5shot",
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_mamlpp_and_anil_presets_build_their_learner(name):
    cfg, base = load_config(name), load_config(PRESETS[name])
    assert config.load_raw(name) != config.load_raw(PRESETS[name])
    assert (cfg.task.n_way, cfg.task.k_shot, cfg.data.dataset) == (base.task.n_way, base.task.k_shot, base.data.dataset)
    cfg.train.device = "cpu"
    learner = fewshot.make_learner(cfg)
    if name.endswith("-anil"):
        assert cfg.maml.adapt == ["head.*"] and learner.adapted_names == ["head.weight", "head.bias"]
        return
    m = cfg.maml
    assert m.inner_steps == 5 and m.lslr and m.multi_step_loss and m.norm == "per_step"
    assert cfg.train.lr_schedule == "cosine" and cfg.train.min_meta_lr == 1e-5
    assert set(learner.step_lrs) == {_key(n) for n in learner.adapted_names}
    assert all(isinstance(b.norm, PerStepBatchNorm) for b in learner.model.blocks)
    assert not any(".norm." in n for n in learner.adapted_names)  # MAML++ does not adapt BatchNorm
    if cfg.data.dataset == "miniimagenet":
        assert m.first_order_iterations == 40500 and cfg.train.iterations == 75000
    else:
        assert m.first_order_iterations == 0 and cfg.train.iterations == 125000


def test_eval_json_records_the_norm_mode(tmp_path):
    from test_folder_dataset import make_folder, run_args

    torch.set_default_dtype(torch.float32)  # images are float32 (the fixture restores float64 after)
    root = make_folder(tmp_path / "imgs", 30, 4)
    run = tmp_path / "run"
    sets = ["maml.norm=inductive", "maml.lslr=true", "maml.multi_step_loss=true", "maml.inner_steps=2"]
    assert cli.main(run_args(run, root, *sets, "train.lr_schedule=cosine")) == 0
    assert cli.main(["eval", str(run)]) == 0
    results = json.loads((run / "eval.json").read_text())
    assert results["norm"] == "inductive"
    assert "BatchNorm: inductive" in (run / "eval.md").read_text()


@pytest.mark.slow
def test_two_processes_with_mamlpp_options_reproduce_one(tmp_path):
    """torchrun: the multi-step loss, LSLR, derivative-order annealing and the cosine step size on
    two ranks reproduce one process (to float summation order)."""
    from test_distributed import SINUSOID, assert_close, run, weights

    mamlpp = [
        "maml.inner_steps=2",
        "maml.multi_step_loss=true",
        "maml.msl_iterations=12",
        "maml.lslr=true",
        "maml.first_order_iterations=8",
        "train.lr_schedule=cosine",
        "train.iterations=20",
    ]
    sets = [a for s in mamlpp for a in ("--set", s)]
    run(["train", *SINUSOID, *sets, "--out", "one"], cwd=tmp_path)
    run(["train", *SINUSOID, *sets, "--out", "two"], procs=2, cwd=tmp_path)
    one, two = weights(tmp_path / "one/maml/checkpoint.pt"), weights(tmp_path / "two/maml/checkpoint.pt")
    assert any(k.startswith("step_lrs.") for k in one)
    assert_close(one, two)


@pytest.mark.parametrize("norm", ["per_step", "inductive"])
def test_batchnorm_modes_resume_bit_identically(tmp_path, norm):
    """Per-step rows and inductive running statistics are saved with the weights: a few-shot run
    stopped after its first iteration and resumed ends where an uninterrupted one does."""
    from test_folder_dataset import make_folder, run_args

    torch.set_default_dtype(torch.float32)  # images are float32 (the fixture restores float64 after)
    root = make_folder(tmp_path / "imgs", 30, 4)
    sets = [f"maml.norm={norm}", "maml.inner_steps=2", "maml.lslr=true", "maml.multi_step_loss=true"]
    assert cli.main(run_args(tmp_path / "straight", root, *sets)) == 0
    assert cli.main(run_args(tmp_path / "stopped", root, *sets, "train.time_limit=1e-9")) == 130
    assert cli.main([*run_args(tmp_path / "stopped", root, *sets, "train.time_limit=0"), "--resume"]) == 0
    a = torch.load(tmp_path / "straight/checkpoint.pt", weights_only=False)["learner"]
    b = torch.load(tmp_path / "stopped/checkpoint.pt", weights_only=False)["learner"]
    assert a.keys() == b.keys() and any(("running_mean" if norm == "inductive" else "norm.bias") in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
