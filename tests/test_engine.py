"""The engine's meta-gradients against independent computations (float64)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import finite_difference_grad, float64, make_batch  # noqa: F401  (float64: autouse)
from mamlkit import MAML, TaskBatch
from mamlkit.models import BatchNorm, mlp


def engine_grad(maml, batch):
    maml.zero_grad(set_to_none=True)
    maml.meta_loss(batch).backward()
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in maml.parameters()]


def assert_matches_fd(maml, batch, rtol=1e-6, atol=1e-8):
    got = engine_grad(maml, batch)
    want = finite_difference_grad(lambda: maml.meta_loss(batch), list(maml.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


def call(model, fast, x):
    # Every name of every parameter, so that shared and tied weights all take the new value.
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    index = {id(p): i for i, p in enumerate(model.parameters())}
    tensors = [fast[index[id(p)]] for _, p in model.named_parameters(remove_duplicate=False)]
    return torch.func.functional_call(model, dict(zip(names, tensors)), (x,), tie_weights=False)


def manual_meta_loss(model, batch, lr, steps, first_order=False):
    """MAML written directly with torch.autograd, one task at a time: the reference."""
    params = list(model.parameters())
    losses = []
    for si, st, qi, qt in zip(*batch):
        fast = params
        for _ in range(steps):
            loss = F.mse_loss(call(model, fast, si), st)
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [p - lr * g for p, g in zip(fast, grads)]
        losses.append(F.mse_loss(call(model, fast, qi), qt))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_matches_finite_differences(strategy, steps):
    torch.manual_seed(0)
    maml = MAML(mlp(2, [8, 8], 1, nn.Tanh), inner_lr=0.1, inner_steps=steps, strategy=strategy)
    batch = make_batch()
    assert_matches_fd(maml, batch)
    torch.testing.assert_close(maml.meta_loss(batch), manual_meta_loss(maml.model, batch, 0.1, steps))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_first_order_is_query_gradient_at_adapted_params(strategy):
    torch.manual_seed(1)
    model = mlp(2, [8], 1, nn.Tanh)
    maml = MAML(model, inner_lr=0.2, inner_steps=2, first_order=True, strategy=strategy)
    batch = make_batch()
    got = engine_grad(maml, batch)
    # Reference: adapt each task without a graph, then differentiate the query loss at the
    # adapted parameters as if they were the meta-parameters.
    names = [n for n, _ in model.named_parameters()]
    want = [torch.zeros_like(p) for p in model.parameters()]
    for si, st, qi, qt in zip(*batch):
        fast = [p.detach().clone() for p in model.parameters()]
        for _ in range(2):
            fast = [f.requires_grad_() for f in fast]
            loss = F.mse_loss(torch.func.functional_call(model, dict(zip(names, fast)), (si,)), st)
            fast = [f - 0.2 * g for f, g in zip(fast, torch.autograd.grad(loss, fast))]
        fast = [f.detach().requires_grad_() for f in fast]
        qloss = F.mse_loss(torch.func.functional_call(model, dict(zip(names, fast)), (qi,)), qt)
        for w, g in zip(want, torch.autograd.grad(qloss, fast)):
            w += g / batch.support_inputs.shape[0]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # ... and differs from the second-order gradient.
    so = engine_grad(MAML(model, inner_lr=0.2, inner_steps=2, strategy=strategy), batch)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(so, got))


def test_vmap_equals_loop():
    torch.manual_seed(2)
    model = mlp(2, [16, 16], 1)
    batch = make_batch(tasks=5)
    results = {}
    for strategy in ["loop", "vmap"]:
        maml = MAML(model, inner_lr=0.05, inner_steps=3, strategy=strategy)
        losses, outputs = maml.meta_forward(batch)
        results[strategy] = (losses, outputs, engine_grad(maml, batch))
    torch.testing.assert_close(results["loop"][0], results["vmap"][0])
    torch.testing.assert_close(results["loop"][1], results["vmap"][1])
    for a, b in zip(results["loop"][2], results["vmap"][2]):
        torch.testing.assert_close(a, b)


class NormNet(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.fc1 = nn.Linear(2, 6)
        self.norm = norm
        self.fc2 = nn.Linear(6, 1)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


@pytest.mark.parametrize(
    "norm",
    [lambda: nn.BatchNorm1d(6, track_running_stats=False), lambda: nn.LayerNorm(6)],
    ids=["BatchNorm1d", "LayerNorm"],
)
def test_torch_norm_layers_are_exact_or_refused(norm):
    torch.manual_seed(3)
    model = NormNet(norm())
    with pytest.raises(ValueError, match="normalisation layers"):
        MAML(model, inner_lr=0.1, strategy="vmap")
    maml = MAML(model, inner_lr=0.1, inner_steps=2, strategy="auto")
    assert maml.strategy == "loop"
    assert_matches_fd(maml, make_batch(k=8, q=8))
    # First order has no second derivative to get wrong: vmap is allowed and agrees with the loop.
    fo = [
        engine_grad(MAML(model, inner_lr=0.1, first_order=True, strategy=s), make_batch(k=8)) for s in ("loop", "vmap")
    ]
    for a, b in zip(*fo):
        torch.testing.assert_close(a, b)


def test_plain_op_batchnorm_is_exact_under_vmap():
    torch.manual_seed(4)
    model = NormNet(BatchNorm(6, affine="both"))
    maml = MAML(model, inner_lr=0.1, inner_steps=2, strategy="vmap")
    assert_matches_fd(maml, make_batch(k=8, q=8))
    # Same maths as torch's BatchNorm with batch statistics.
    x = torch.randn(8, 6)
    torch.testing.assert_close(BatchNorm(6)(x), F.batch_norm(x, None, None, training=True))
    # Images (the conv models' case): statistics over batch and space, per channel, scale and shift.
    norm = BatchNorm(6, affine="both")
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    x = torch.randn(8, 6, 5, 4) * 3 + 1
    want = F.batch_norm(x, None, None, norm.weight, norm.bias, training=True)
    torch.testing.assert_close(norm(x), want)


class SharedNet(nn.Module):
    """One Linear registered under two names, used twice."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(2, 4)
        self.shared = nn.Linear(4, 4)
        self.again = self.shared
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.again(torch.tanh(self.shared(torch.tanh(self.inp(x)))))))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_shared_weights(strategy):
    torch.manual_seed(5)
    model = SharedNet()
    maml = MAML(model, inner_lr=0.1, inner_steps=2, strategy=strategy)
    assert "again.weight" not in maml.params()
    batch = make_batch()
    assert_matches_fd(maml, batch)
    # The model still holds its own Parameters, and still shares them.
    assert isinstance(model.shared.weight, nn.Parameter) and model.again is model.shared
    torch.testing.assert_close(maml.meta_loss(batch), manual_meta_loss(model, batch, 0.1, 2))


class OddNet(nn.Module):
    """A buffer, a frozen parameter, and a parameter the loss never uses."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 4)
        self.head = nn.Linear(4, 1)
        self.frozen = nn.Parameter(torch.full((4,), 0.5), requires_grad=False)
        self.unused = nn.Parameter(torch.ones(3))
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x) * self.scale + self.frozen))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_buffer_frozen_and_unused_parameters(strategy):
    torch.manual_seed(6)
    model = OddNet()
    maml = MAML(model, inner_lr=0.1, inner_steps=2, strategy=strategy)
    assert "frozen" not in maml.params() and "unused" in maml.params()
    batch = make_batch()
    trainable = [p for p in maml.parameters() if p.requires_grad]
    maml.zero_grad(set_to_none=True)
    maml.meta_loss(batch).backward()
    want = finite_difference_grad(lambda: maml.meta_loss(batch), trainable)
    for p, w in zip(trainable, want):
        torch.testing.assert_close(p.grad if p.grad is not None else torch.zeros_like(p), w, rtol=1e-6, atol=1e-8)
    assert model.frozen.grad is None
    torch.testing.assert_close(
        maml.adapt(batch.support_inputs[0], batch.support_targets[0])["unused"], model.unused.detach()
    )


def test_adapt_leaves_model_untouched_and_follows_schedule():
    torch.manual_seed(7)
    model = mlp(2, [8], 1)
    maml = MAML(model, inner_lr=0.1)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, y = make_batch().support_inputs[0], make_batch().support_targets[0]
    adapted = maml.adapt(x, y, steps=2, lr=[0.1, 0.05])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    # Same two steps by hand.
    p = {k: v.detach() for k, v in model.named_parameters()}
    for lr in [0.1, 0.05]:
        g = torch.func.grad(lambda p: F.mse_loss(torch.func.functional_call(model, p, (x,)), y))(p)
        p = {k: p[k] - lr * g[k] for k in p}
    for k in p:
        torch.testing.assert_close(adapted[k], p[k])
    assert F.mse_loss(maml(x, adapted), y) < F.mse_loss(maml(x), y)


def test_only_selected_parameters_adapt_but_all_are_meta_learned():
    torch.manual_seed(8)
    model = mlp(2, [8], 1)
    maml = MAML(model, inner_lr=0.1, adapt=["2.*"], inner_steps=2)
    batch = make_batch()
    adapted = maml.adapt(batch.support_inputs[0], batch.support_targets[0])
    assert adapted["0.weight"] is model[0].weight
    assert not torch.equal(adapted["2.weight"], model[2].weight)
    assert_matches_fd(maml, batch)
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        MAML(model, adapt=["nothing.*"])


def test_meta_sgd_learned_step_sizes_match_finite_differences():
    torch.manual_seed(9)
    maml = MAML(mlp(2, [6], 1, nn.Tanh), inner_lr=0.1, inner_steps=2, learn_inner_lr=True, strategy="vmap")
    assert len(list(maml.inner_lrs.parameters())) == 4
    assert_matches_fd(maml, make_batch())


def test_meta_sgd_steps_each_element_by_its_own_learned_size():
    # An independent Meta-SGD: p <- p - lr_p * grad_p elementwise with each parameter's own sizes,
    # so step sizes given to the wrong parameter (or averaged) would show here and not in
    # finite differences, which only check the gradient of whatever meta_loss computes.
    torch.manual_seed(9)
    model = mlp(2, [6], 1, nn.Tanh)
    maml = MAML(model, inner_lr=0.1, inner_steps=2, learn_inner_lr=True)
    names = [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        for n in names:
            maml.inner_lrs[n.replace(".", "__")].uniform_(0.01, 0.3)
    batch = make_batch()

    def by_hand(t: int) -> dict:
        p = dict(model.named_parameters())
        for _ in range(2):
            out = torch.func.functional_call(model, p, (batch.support_inputs[t],))
            grads = torch.autograd.grad(F.mse_loss(out, batch.support_targets[t]), list(p.values()), create_graph=True)
            p = {n: p[n] - maml.inner_lrs[n.replace(".", "__")] * g for n, g in zip(names, grads)}
        return p

    for t in range(3):
        adapted = maml.adapt(batch.support_inputs[t], batch.support_targets[t])
        for n, v in by_hand(t).items():
            torch.testing.assert_close(adapted[n], v)
    want = torch.stack(
        [
            F.mse_loss(torch.func.functional_call(model, by_hand(t), (batch.query_inputs[t],)), batch.query_targets[t])
            for t in range(3)
        ]
    ).mean()
    torch.testing.assert_close(maml.meta_loss(batch), want)


def test_running_statistics_are_refused_with_a_fix():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        MAML(NormNet(nn.BatchNorm1d(6)))


def test_adaptation_curve_starts_at_unadapted_loss_and_matches_adapt():
    torch.manual_seed(10)
    maml = MAML(mlp(2, [8], 1), inner_lr=0.05)
    batch = make_batch(tasks=4)
    curve = maml.adaptation_curve(batch, steps=3)["loss"]
    assert curve.shape == (4, 4)
    for t in range(4):
        torch.testing.assert_close(curve[t, 0], F.mse_loss(maml(batch.query_inputs[t]), batch.query_targets[t]))
        adapted = maml.adapt(batch.support_inputs[t], batch.support_targets[t], steps=3)
        torch.testing.assert_close(
            curve[t, 3], F.mse_loss(maml(batch.query_inputs[t], adapted), batch.query_targets[t])
        )


class TiedNet(nn.Module):
    """One Parameter held by two different modules (tied input and output weights)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 3)
        self.dec = nn.Linear(3, 3, bias=False)
        self.dec.weight = self.enc.weight
        self.out = nn.Linear(3, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.dec(torch.tanh(self.enc(x)))))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_tied_parameter_in_two_modules(strategy):
    torch.manual_seed(11)
    model = TiedNet()
    maml = MAML(model, inner_lr=0.1, inner_steps=2, strategy=strategy)
    assert "dec.weight" not in maml.params()
    batch = make_batch(d_in=3)
    assert_matches_fd(maml, batch)
    torch.testing.assert_close(maml.meta_loss(batch), manual_meta_loss(model, batch, 0.1, 2))
    assert isinstance(model.dec.weight, nn.Parameter) and model.dec.weight is model.enc.weight


def test_the_vmap_normalisation_trap_is_real():
    """Why the guard exists: bypassing it gives a wrong second-order meta-gradient.

    If a torch upgrade makes this test fail, vmap has become exact through torch's
    normalisation layers and the guard in engine/strategies.py can be relaxed.
    """
    torch.manual_seed(3)
    maml = MAML(NormNet(nn.LayerNorm(6)), inner_lr=0.1, inner_steps=2, strategy="loop")
    maml.strategy = "vmap"
    batch = make_batch(k=8, q=8)
    got = engine_grad(maml, batch)
    want = finite_difference_grad(lambda: maml.meta_loss(batch), list(maml.parameters()))
    worst = max(((g - w).norm() / w.norm()).item() for g, w in zip(got, want))
    assert worst > 1e-4


def test_auto_strategy_is_measured_and_changes_nothing():
    torch.manual_seed(12)
    model = mlp(2, [8], 1)
    batch = make_batch()
    auto = MAML(model, inner_lr=0.1, strategy="auto")
    rng = torch.get_rng_state()
    got = engine_grad(auto, batch)
    assert torch.equal(rng, torch.get_rng_state())  # timing runs consume no randomness
    assert set(auto.strategy_timings) == {"vmap", "loop"}
    assert auto.strategy == min(auto.strategy_timings, key=auto.strategy_timings.get)
    want = engine_grad(MAML(model, inner_lr=0.1, strategy="loop"), batch)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)  # and the timing runs left no gradient behind


def test_auto_times_a_few_tasks_once_per_model_and_shapes(monkeypatch):
    """The measurement runs each candidate twice (a warm-up, one timed run) on at most
    ``PROBE_TASKS`` tasks of the first meta-batch, and a second learner with the same model and
    shapes reuses it (a run's models, a resume in the same process)."""
    from mamlkit.engine import maml as maml_module

    monkeypatch.setattr(maml_module, "_MEASURED", {})
    monkeypatch.setattr(maml_module, "CLOSE_CALL", 0.0)  # no second timing on the whole batch (next test)
    seen = []
    real = MAML._meta_forward_impl

    def counted(self, params, lr, si, *rest):
        seen.append((self.strategy, si.shape[0]))
        return real(self, params, lr, si, *rest)

    monkeypatch.setattr(MAML, "_meta_forward_impl", counted)
    batch = make_batch(tasks=12)
    first = MAML(mlp(2, [8], 1), inner_lr=0.1, strategy="auto")
    first.meta_loss(batch)
    timing = seen[:-1]  # the last call is the meta-loss itself, on the whole batch
    assert sorted(timing) == sorted([("vmap", maml_module.PROBE_TASKS)] * 2 + [("loop", maml_module.PROBE_TASKS)] * 2)
    assert seen[-1][1] == 12
    seen.clear()
    second = MAML(mlp(2, [8], 1), inner_lr=0.1, strategy="auto")
    second.meta_loss(batch)
    assert seen == [(second.strategy, 12)] and second.strategy_timings == first.strategy_timings


@pytest.mark.parametrize(
    ("on_the_probe", "timed_again"), [({"vmap": 1.1, "loop": 1.0}, True), ({"vmap": 3.0, "loop": 1.0}, False)]
)
def test_auto_times_a_close_call_again_on_the_whole_meta_batch(monkeypatch, on_the_probe, timed_again):
    """On a few tasks the loop and vmap can tie where vmap is several times faster on the whole
    batch (the sinusoid's 25 tasks, which then compiled to a 4x slower loop): timings within
    ``CLOSE_CALL`` of each other on the probe are taken again on every task of the batch."""
    from mamlkit.engine import maml as maml_module

    monkeypatch.setattr(maml_module, "_MEASURED", {})
    seen, timed_on = [], []
    real = MAML._meta_forward_impl

    def counted(self, params, lr, si, *rest):
        seen.append(si.shape[0])
        return real(self, params, lr, si, *rest)

    def timing(run, candidates, sync, repeats=3, errors=None):
        run("vmap")  # the real run, to see how many tasks this measurement times
        timed_on.append(seen[-1])
        return dict(on_the_probe) if len(timed_on) == 1 else {"vmap": 1.0, "loop": 5.0}

    monkeypatch.setattr(MAML, "_meta_forward_impl", counted)
    monkeypatch.setattr(maml_module, "fastest", timing)
    maml = MAML(mlp(2, [8], 1), inner_lr=0.1, strategy="auto")
    maml.meta_loss(make_batch(tasks=12))
    assert timed_on == ([maml_module.PROBE_TASKS, 12] if timed_again else [maml_module.PROBE_TASKS])
    assert maml.strategy == ("vmap" if timed_again else "loop")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(strategy="vmap", inner_steps=2),
        dict(strategy="loop", inner_steps=2),
        dict(strategy="vmap", first_order=True, inner_steps=2),
        dict(strategy="vmap", learn_inner_lr=True),
        dict(strategy="vmap", adapt=["2.*"]),
    ],
    ids=["vmap", "loop", "first-order", "meta-sgd", "head-only"],
)
def test_meta_backward_equals_autograd_backward(kwargs):
    """The trainer's fast path (one torch.func.grad transform) gives autograd's meta-gradient."""
    torch.manual_seed(13)
    model = mlp(2, [8], 1, nn.Tanh)
    batch = make_batch()
    maml = MAML(model, inner_lr=0.1, **kwargs)
    maml._functional_grad = True  # the path compile=True takes, here without the compile time
    want = engine_grad(maml, batch)
    maml.zero_grad(set_to_none=True)
    loss = maml.meta_backward(batch)
    torch.testing.assert_close(loss, maml.meta_loss(batch).detach())
    for p, w in zip(maml.parameters(), want):
        torch.testing.assert_close(p.grad, w)
    maml.meta_backward(batch)  # accumulates, like backward()
    for p, w in zip(maml.parameters(), want):
        torch.testing.assert_close(p.grad, 2 * w)


@pytest.mark.slow
def test_meta_backward_falls_back_to_autograd_for_torch_norm_layers():
    torch.manual_seed(14)
    maml = MAML(NormNet(nn.LayerNorm(6)), inner_lr=0.1, inner_steps=2, compile=True)
    assert not maml._functional_grad
    maml._compile = False  # the fallback is what is tested, not the compiler
    batch = make_batch(k=8, q=8)
    maml.zero_grad(set_to_none=True)
    maml.meta_backward(batch)
    got = [p.grad.clone() for p in maml.parameters()]
    want = finite_difference_grad(lambda: maml.meta_loss(batch), list(maml.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_cuda_graph_path_gives_autograd_meta_gradients_and_keeps_outputs(device):
    """compile + cuda_graphs (graphs are captured on CUDA only; on the CPU the same code path runs
    without them): meta-gradients match autograd's, and an output survives the next replay."""
    torch.manual_seed(15)
    model = mlp(2, [8], 1, nn.Tanh).to(device)
    eager = MAML(copy.deepcopy(model), inner_lr=0.1, inner_steps=2, strategy="vmap")
    maml = MAML(model, inner_lr=0.1, inner_steps=2, strategy="vmap", compile=True, cuda_graphs=True)
    batches = [make_batch(seed=s).to(device) for s in (0, 1, 2)]
    losses = []
    for batch in batches:
        want = engine_grad(eager, batch)
        maml.zero_grad(set_to_none=True)
        losses.append(maml.meta_backward(batch))
        for p, w in zip(maml.parameters(), want):
            torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-5)
    for loss, batch in zip(losses, batches):  # the first two were computed before later replays
        torch.testing.assert_close(loss, eager.meta_loss(batch).detach(), rtol=1e-4, atol=1e-5)


def test_cuda_graphs_need_compile():
    with pytest.raises(ValueError, match="compile=True"):
        MAML(mlp(2, [8], 1), cuda_graphs=True)


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(learn_inner_lr=True), dict(adapt=["2.*"])], ids=["all", "meta-sgd", "head-only"]
)
def test_checkpointed_inner_loop_matches_finite_differences_and_the_stored_one(kwargs):
    """checkpoint_inner recomputes inner steps in the backward pass: same meta-gradient, exactly."""
    torch.manual_seed(16)
    model = mlp(2, [8, 8], 1, nn.Tanh)
    batch = make_batch()
    stored = MAML(copy.deepcopy(model), inner_lr=0.1, inner_steps=3, strategy="loop", **kwargs)
    maml = MAML(model, inner_lr=0.1, inner_steps=3, checkpoint_inner=True, **kwargs)
    assert maml.strategy == "loop"
    for got, want in zip(engine_grad(maml, batch), engine_grad(stored, batch)):
        torch.testing.assert_close(got, want)
    assert_matches_fd(maml, batch)


def test_checkpointed_inner_loop_through_batch_norm_matches_finite_differences():
    torch.manual_seed(17)
    maml = MAML(
        NormNet(nn.BatchNorm1d(6, track_running_stats=False)), inner_lr=0.1, inner_steps=2, checkpoint_inner=True
    )
    assert_matches_fd(maml, make_batch(k=8, q=8))


def test_checkpointed_inner_loop_refuses_vmap_and_compile():
    with pytest.raises(ValueError, match="checkpoint_inner"):
        MAML(mlp(2, [8], 1), checkpoint_inner=True, strategy="vmap")
    with pytest.raises(ValueError, match="checkpoint_inner"):
        MAML(mlp(2, [8], 1), checkpoint_inner=True, compile=True)


def test_bf16_autocast_meta_gradient_is_close_to_float32():
    """autocast='bf16' changes precision, not the mathematics: the meta-gradient stays within bf16's
    few-percent error of the float32 one, with float32 parameters and gradients."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(18)
    model = mlp(2, [32, 32], 1, nn.Tanh)
    batch = TaskBatch(*(t.float() for t in make_batch()))
    ref = MAML(copy.deepcopy(model), inner_lr=0.1, inner_steps=2, strategy="vmap")
    maml = MAML(model, inner_lr=0.1, inner_steps=2, strategy="vmap", autocast="bf16")
    want, got = engine_grad(ref, batch), engine_grad(maml, batch)
    assert all(g.dtype == torch.float32 for g in got)
    num = sum(((g - w) ** 2).sum() for g, w in zip(got, want)) ** 0.5
    den = sum((w**2).sum() for w in want) ** 0.5
    assert 0 < num / den < 0.05


@pytest.mark.parametrize(
    ("strategy", "tasks", "warned"),
    [("loop", 3, True), ("vmap", 3, False), ("loop", 1, False), ("auto", 3, False), ("auto-bn", 3, True)],
)
def test_a_compiled_loop_says_it_unrolls_the_meta_batch(monkeypatch, caplog, strategy, tasks, warned):
    """Compiled, the loop puts every task of the meta-batch in one graph, and compiling took several
    times vmap's time for Omniglot's 32 tasks (BENCHMARKS.md): the run says so once, naming the ways
    out, where the loop was asked for or the only candidate (torch's BatchNorm under second order),
    not where `auto` timed vmap and found the loop faster; vmap and a one-task batch compile one task."""
    from mamlkit.engine import maml as engine

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the warning, not the compile time
    monkeypatch.setattr(engine, "fastest", lambda run, candidates, *a, **k: {s: float(s != "loop") for s in candidates})
    monkeypatch.setattr(engine, "_MEASURED", {})
    model = mlp(2, [8], 1)
    if strategy == "auto-bn":
        model = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(), nn.Linear(8, 1))
    maml = MAML(model, inner_lr=0.1, strategy=strategy.removesuffix("-bn"), compile=True)
    with caplog.at_level("WARNING", logger="mamlkit"):
        for seed in (0, 1):
            maml.meta_backward(make_batch(tasks=tasks, seed=seed))
        maml.meta_loss(make_batch(tasks=tasks, seed=2))  # the forward computation compiles separately
    said = [r.getMessage() for r in caplog.records if "unrolls" in r.getMessage()]
    if strategy.startswith("auto"):
        assert maml.strategy == "loop"
    assert len(said) == int(warned), said
    if warned:
        assert f"unrolls the {tasks} tasks" in said[0] and "compile=False" in said[0]
