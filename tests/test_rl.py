"""RL: navigation dynamics, returns/GAE, the linear baseline, conjugate gradient, TRPO through the
inner step (KL bound, Hessian-vector products, meta-gradient) and the experiment end to end."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

gym = pytest.importorskip("gymnasium")  # the rl extra; the engine's tests run without it

from mamlkit import cli, config  # noqa: E402
from mamlkit.engine import MAML  # noqa: E402
from mamlkit.experiments import CONFIGS, load_config  # noqa: E402
from mamlkit.rl import envs  # noqa: E402
from mamlkit.rl.baseline import discounted_returns, features, fit_linear_baseline, gae  # noqa: E402
from mamlkit.rl.config import RLEnvConfig  # noqa: E402
from mamlkit.rl.metabatch import advantage_fn, sample_meta_batch  # noqa: E402
from mamlkit.rl.navigation import Navigation2DEnv, NavigationBatch, sample_goals  # noqa: E402
from mamlkit.rl.policy import GaussianMLPPolicy, kl, log_prob, reinforce_loss  # noqa: E402
from mamlkit.rl.sampler import Episodes, advantages, rollout  # noqa: E402
from mamlkit.rl.tasks import NavigationTasks  # noqa: E402
from mamlkit.rl.trpo import MetaTRPO, conjugate_gradient, conjugate_gradient_with_product  # noqa: E402

# -- environment ------------------------------------------------------------------------------


def test_navigation_clips_rewards_and_terminates():
    env = gym.make(envs.NAVIGATION)
    env.unwrapped.set_task({"goal": np.array([0.25, 0.0], np.float32)})
    obs, _ = env.reset(seed=0)
    assert np.allclose(obs, 0)
    obs, reward, terminated, truncated, _ = env.step(np.array([5.0, -5.0]))  # clipped to +-0.1
    assert np.allclose(obs, [0.1, -0.1])
    assert reward == pytest.approx(-np.hypot(0.15, 0.1), rel=1e-6)
    assert not terminated and not truncated
    env.step(np.array([0.1, 0.1]))
    obs, reward, terminated, _, _ = env.step(np.array([0.045, 0.0]))  # 0.005 from the goal
    assert np.allclose(obs, [0.245, 0.0], atol=1e-6)
    assert reward == pytest.approx(-0.005, abs=1e-6) and terminated


def test_navigation_time_limit_and_task_api():
    env = gym.make(envs.NAVIGATION)
    tasks = env.unwrapped.sample_tasks(50, np.random.default_rng(0))
    goals = np.stack([t["goal"] for t in tasks])
    assert goals.shape == (50, 2) and goals.min() >= -0.5 and goals.max() <= 0.5
    env.unwrapped.set_task(tasks[0])
    assert np.array_equal(env.unwrapped.get_task()["goal"], tasks[0]["goal"])
    env.reset(seed=0)
    for _ in range(100):
        _, _, terminated, truncated, _ = env.step(np.zeros(2))
        assert not terminated
    assert truncated  # horizon 100


def test_normalized_actions_scale_then_clip():
    """rllab's normalize(): the policy acts in [-1, 1], the env moves by max_action times that, clipped."""
    env = NavigationBatch(torch.tensor([[0.3, 0.3]]), 1, action_scale=0.1)
    env.reset()
    obs, _, _ = env.step(torch.tensor([[[0.5, -3.0]]]))
    assert torch.allclose(obs, torch.tensor([[[0.05, -0.1]]]))
    gym_env = gym.make(envs.NAVIGATION, normalized=True)
    assert gym_env.action_space.high.tolist() == [1.0, 1.0]
    gym_env.unwrapped.set_task({"goal": np.array([0.3, 0.3], np.float32)})
    gym_env.reset(seed=0)
    assert np.allclose(gym_env.step(np.array([0.5, -3.0]))[0], [0.05, -0.1])


def test_batched_navigation_matches_the_gymnasium_env():
    goals = sample_goals(3, torch.Generator().manual_seed(0))
    batch = NavigationBatch(goals, 2)
    batch.reset()
    actions = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(1)) * 0.2
    single = Navigation2DEnv()
    single.set_task({"goal": goals[1].numpy()})
    single.reset()
    for a in actions:
        obs, reward, _ = batch.step(a)
        o, r, *_ = single.step(a[1, 0].numpy())
        assert np.allclose(obs[1, 0].numpy(), o, atol=1e-6) and r == pytest.approx(reward[1, 0].item(), abs=1e-6)


def test_rollout_masks_after_termination():
    goals = torch.tensor([[0.05, 0.0]])
    env = NavigationBatch(goals, 1)
    toward_goal = lambda obs: (torch.tensor([0.05, 0.0]).expand_as(obs), torch.full_like(obs, -30.0))  # noqa: E731
    ep = rollout(toward_goal, env, torch.randn(1, 1, 5, 2))
    assert ep.mask[0, 0].tolist() == [1, 0, 0, 0, 0]  # at the goal after one step
    assert ep.returns()[0, 0].item() == pytest.approx(0.0, abs=1e-5)


# -- returns, advantages, baseline ---------------------------------------------------------------


def test_discounted_returns_and_gae_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # ended after the third step
    g = 0.5
    assert discounted_returns(r, m, g).tolist() == [[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 0.0]]
    v = torch.tensor([[0.5, 1.0, 2.0, 9.0]])
    d = [1 + g * 1.0 - 0.5, 2 + g * 2.0 - 1.0, 3 + 0.0 - 2.0]  # V after the last valid step is 0
    lam = 0.8
    want = [d[0] + g * lam * d[1] + (g * lam) ** 2 * d[2], d[1] + g * lam * d[2], d[2], 0.0]
    assert torch.allclose(gae(r, v, m, g, lam), torch.tensor([want]))
    # lambda = 1: returns minus the baseline
    assert torch.allclose(gae(r, v, m, g, 1.0), (discounted_returns(r, m, g) - v) * m)


def test_linear_baseline_fits_a_linear_target():
    obs = torch.randn(6, 30, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mask = torch.ones(6, 30, dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5, 0.3, 4.0, -1.0, 2.0, 0.7], dtype=torch.float64)
    target = features(obs) @ w
    assert torch.allclose(fit_linear_baseline(obs, target, mask, reg=1e-10), target, atol=1e-5)


def test_baseline_features_are_rllabs():
    # rllab's LinearFeatureBaseline written out: observations clipped to [-10, 10], their squares,
    # the step t / 100, its square and cube, and a constant, for each step of each trajectory.
    obs = 8 * torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert obs.abs().max() > 10  # some values are clipped
    for i in range(3):
        for t in range(5):
            o = obs[i, t].clamp(-10, 10)
            s = t / 100
            want = torch.tensor([*o.tolist(), *(o * o).tolist(), s, s**2, s**3, 1.0], dtype=torch.float64)
            torch.testing.assert_close(features(obs)[i, t], want)


def test_advantages_are_centred_per_task_on_valid_steps_only():
    g = torch.Generator().manual_seed(2)
    obs = torch.randn(2, 3, 6, 2, generator=g, dtype=torch.float64)
    rewards = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    rewards[1] *= 100  # the tasks' scales differ: one normalisation over both would not centre each
    mask = torch.ones(2, 3, 6, dtype=torch.float64)
    mask[0, 1, 4:] = 0  # episodes that ended early
    mask[1, 2, 2:] = 0
    rewards = rewards * mask
    ep = Episodes(obs, torch.zeros(2, 3, 6, 1, dtype=torch.float64), rewards, mask)
    adv = advantages(ep, gamma=0.99, lam=1.0, center=True)
    assert (adv[mask == 0] == 0).all()
    for task in range(2):
        valid = adv[task][mask[task].bool()]
        assert valid.mean().abs() < 1e-9
        assert valid.var(unbiased=False).sqrt().item() == pytest.approx(1.0, abs=1e-6)
    # Uncentred: returns minus each task's own baseline (lambda = 1), fitted on that task alone.
    raw = advantages(ep, gamma=0.99, lam=1.0, center=False)
    for task in range(2):
        returns = discounted_returns(rewards[task], mask[task], 0.99)
        values = fit_linear_baseline(obs[task], returns, mask[task])
        torch.testing.assert_close(raw[task], (returns - values) * mask[task])


# -- TRPO pieces -----------------------------------------------------------------------------------


def test_conjugate_gradient_solves_spd_system():
    a = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = a @ a.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    x = conjugate_gradient(lambda v: h @ v, b, iters=10)
    assert torch.allclose(h @ x, b, atol=1e-8)
    # The product TRPO's step size uses, accumulated from CG's own products, even when CG stops
    # short of the solution (3 iterations), where it is not b.
    x3, hx3 = conjugate_gradient_with_product(lambda v: h @ v, b, iters=3)
    assert torch.allclose(hx3, h @ x3, atol=1e-10) and not torch.allclose(hx3, b, atol=1e-3)


def test_gaussian_kl_and_log_prob():
    mean, log_std = torch.tensor([[0.3, -1.0]]), torch.tensor([[0.2, -0.4]])
    d = torch.distributions.Normal(mean, log_std.exp())
    a = torch.tensor([[0.1, 0.5]])
    assert torch.allclose(log_prob(mean, log_std, a), d.log_prob(a).sum(-1))
    d2 = torch.distributions.Normal(mean + 0.3, (log_std - 0.1).exp())
    assert torch.allclose(
        kl((mean, log_std), (mean + 0.3, log_std - 0.1)), torch.distributions.kl_divergence(d, d2).sum(-1)
    )


def tiny_problem(first_order=False, dtype=torch.float64, tasks=3, seed=0, ended=False):
    """A float64 policy, a meta-batch sampled by the experiment's own functions, and MetaTRPO.
    ``ended``: episodes end at random steps (as the ant's do), so TRPO must skip the padding."""
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(2, 2, (8, 8)).to(dtype)
    with torch.no_grad():  # zero biases put every ReLU exactly on its kink at the start state (0, 0)
        for name, p in policy.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
    maml = MAML(policy, reinforce_loss, inner_lr=0.1, first_order=first_order, strategy="loop")
    trpo = MetaTRPO(maml, cg_iters=10)
    g = torch.Generator().manual_seed(seed)
    family = NavigationTasks(RLEnvConfig(horizon=12, normalize_actions=False))
    goals = sample_goals(tasks, g).to(dtype)
    seeds = torch.randint(2**30, (2, tasks), generator=g)
    data, _ = sample_meta_batch(maml, family, goals, 5, advantage_fn(0.99, 1.0, True, 1e-5), seeds)
    if ended:
        lengths = torch.randint(1, 13, (2, tasks, 5, 1), generator=g)
        pre_mask, mask = (torch.arange(12) < lengths).to(dtype)
        actions, adv, natural = data.pre_targets
        pre_mask, mask = pre_mask * natural, mask * data.mask
        data = dataclasses.replace(
            data, pre_targets=(actions, adv * pre_mask, pre_mask), advantages=data.advantages * mask, mask=mask
        )
        assert 0.2 < mask.mean() < 0.8 and 0.2 < pre_mask.mean() < 0.8
        # The post-update episodes' old policy: the one adapted on the shortened pre-update episodes.
        with torch.no_grad():
            old = [
                maml(data.obs[i], maml.adapt(data.pre_obs[i], tuple(t[i] for t in data.pre_targets)))
                for i in range(tasks)
            ]
        data = dataclasses.replace(
            data, old_mean=torch.stack([m for m, _ in old]), old_log_std=torch.stack([s for _, s in old])
        )
    return maml, trpo, data


@pytest.mark.parametrize("ended", [False, True])
def test_kl_hvp_is_the_hessian_of_the_kl_through_the_inner_step(ended):
    maml, trpo, data = tiny_problem(ended=ended)
    params = maml.params()
    leaves = list(params.values())
    _, kl_value = trpo.objectives(data, params, create_graph=True)
    grad = torch.cat([x.reshape(-1) for x in torch.autograd.grad(kl_value, leaves, create_graph=True)])
    v = torch.randn(grad.numel(), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = torch.cat([x.reshape(-1) for x in torch.autograd.grad(grad @ v, leaves)])
    fast = trpo.kl_hvp(data, params, create_graph=True)(v) - trpo.cg_damping * v
    assert torch.allclose(fast, exact, rtol=1e-6, atol=1e-10)
    # As ``step`` uses it: on the surrogate's graph, after the meta-gradient's backward pass.
    outputs = trpo.policy_outputs(data, params, create_graph=True)
    surr, _ = trpo.surrogate_and_kl(data, outputs)
    torch.autograd.grad(surr, leaves, retain_graph=True)
    shared = trpo.kl_hvp(data, params, create_graph=True, outputs=outputs)
    assert torch.allclose(shared(v) - trpo.cg_damping * v, exact, rtol=1e-6, atol=1e-10)
    assert torch.allclose(shared(2 * v) - trpo.cg_damping * 2 * v, 2 * exact, rtol=1e-6, atol=1e-10)  # reusable


@pytest.mark.parametrize("ended", [False, True])
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_batched_objectives_equal_a_loop_over_tasks(strategy, ended):
    """TRPO computes all tasks together (the loop only on the steps before episodes ended); the
    same surrogate and KL, task by task on the padded episodes, by hand."""
    maml, trpo, data = tiny_problem(tasks=4, ended=ended)
    trpo.strategy = strategy
    params = maml.params()
    rng = torch.Generator().manual_seed(5)
    shifted = {k: p.detach() + 0.05 * torch.randn(p.shape, generator=rng, dtype=p.dtype) for k, p in params.items()}
    surr, kl_value = trpo.objectives(data, shifted, create_graph=False)
    surrs, kls = [], []
    for i in range(len(data)):
        targets = tuple(t[i] for t in data.pre_targets)
        adapted = maml.adapt(data.pre_obs[i], targets, steps=1, lr=0.1, params=shifted)
        mean, log_std = maml(data.obs[i], adapted)
        old = (data.old_mean[i], data.old_log_std[i])
        ratio = torch.exp(log_prob(mean, log_std, data.actions[i]) - log_prob(*old, data.actions[i]))
        m = data.mask[i]
        surrs.append((ratio * data.advantages[i] * m).sum() / m.sum())
        kls.append((kl(old, (mean, log_std)) * m).sum() / m.sum())
    torch.testing.assert_close(surr, torch.stack(surrs).mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kl_value, torch.stack(kls).mean(), rtol=1e-10, atol=1e-12)
    assert kl_value > 0  # the shift moved the policy: the comparison is not of zeros


@pytest.mark.parametrize("ended", [False, True])
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_meta_gradient_matches_finite_differences(strategy, ended):
    """The surrogate's gradient through the inner step (second order) against central differences."""
    maml, trpo, data = tiny_problem(ended=ended)
    trpo.strategy = strategy
    params = maml.params()
    surr, _ = trpo.objectives(data, params, create_graph=True)
    grads = torch.autograd.grad(surr, list(params.values()))
    direction = [torch.randn_like(p) for p in params.values()]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction)).item()
    eps = 1e-5

    def at(sign):
        shifted = {k: p.detach() + sign * eps * d for (k, p), d in zip(params.items(), direction)}
        return trpo.objectives(data, shifted, create_graph=False)[0].item()

    numeric = (at(1) - at(-1)) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-5)
    # The first-order variant drops the inner step's Hessian, so it differs measurably.
    fo_maml = MAML(maml.model, reinforce_loss, inner_lr=0.1, first_order=True, strategy="loop")
    fo_surr, _ = MetaTRPO(fo_maml).objectives(data, params, False)
    fo = torch.autograd.grad(fo_surr, list(params.values()))
    assert abs(sum((g * d).sum() for g, d in zip(fo, direction)).item() - numeric) > 1e-4 * abs(numeric)


@pytest.mark.parametrize("first_order", [False, True])
def test_trpo_step_respects_the_kl_bound_and_improves(first_order):
    maml, trpo, data = tiny_problem(first_order=first_order)
    before = trpo.objectives(data, maml.params(), create_graph=False)[0].item()
    stats = trpo.step(data)
    with torch.no_grad():
        after, kl_after = trpo.objectives(data, maml.params(), create_graph=False)
    assert kl_after.item() <= trpo.max_kl + 1e-12
    assert stats["backtracks"] < trpo.max_backtracks  # a step was taken
    assert after.item() > before
    assert stats["kl"] == pytest.approx(kl_after.item())


# -- experiment ------------------------------------------------------------------------------------


def test_config_registered_and_checked():
    cfg = load_config("rl-navigation2d")
    assert isinstance(cfg, CONFIGS["rl"]) and cfg.train.meta_batch_size == 20
    assert cfg.maml.inner_lr == 0.1 and cfg.algo.max_kl == 0.01
    with pytest.raises(config.ConfigError, match="models"):
        load_config("rl-navigation2d-tiny", ["models=[maml,bogus]"])
    with pytest.warns(UserWarning, match="env.num_envs is no longer used"):  # as old runs' configs hold it
        assert load_config("rl-navigation2d-tiny", ["env.num_envs=8"]).env.sim_threads == 0
    with pytest.raises(config.ConfigError, match="learn_inner_lr.*not supported.*uses only maml.inner_lr"):
        load_config("rl-navigation2d-tiny", ["maml.learn_inner_lr=true"])
    with pytest.raises(config.ConfigError, match="maml.compile, maml.autocast: not supported"):
        load_config("rl-navigation2d-tiny", ["maml.compile=true", "maml.autocast=bf16"])


def test_train_resume_eval_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "rl-navigation2d-tiny", "--out", str(out), "--quiet"]) == 0
    assert cli.main(["train", "rl-navigation2d-tiny", "--out", str(out), "--quiet"]) == 2  # exists: no overwrite
    # A second run stopped after 1 iteration and resumed ends where the straight run did.
    half = tmp_path / "half"
    assert (
        cli.main(["train", "rl-navigation2d-tiny", "--out", str(half), "--quiet", "--set", "train.iterations=1"]) == 0
    )
    assert (
        cli.main(
            ["train", "rl-navigation2d-tiny", "--out", str(half), "--quiet", "--resume", "--set", "train.iterations=2"]
        )
        == 0
    )
    for kind in ("maml", "pretrained", "oracle"):
        a = torch.load(out / kind / "checkpoint.pt", weights_only=False)["learner"]
        b = torch.load(half / kind / "checkpoint.pt", weights_only=False)["learner"]
        assert all(torch.equal(a[k], b[k]) for k in a), kind
    assert cli.main(["plot", str(out)]) == 0  # before any evaluation: the training curves alone
    assert (out / "plots" / "training_returns.png").exists()
    assert not (out / "plots" / "return_vs_steps.png").exists()
    assert "has no eval.json" in capsys.readouterr().out
    assert cli.main(["eval", str(out)]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert set(res["models"]) == {"maml", "pretrained", "oracle", "random"}
    assert len(res["models"]["maml"]["returns"]) == 3 and len(res["models"]["oracle"]["returns"]) == 1
    assert len(res["models"]["maml"]["per_task"]) == 4
    assert torch.tensor(res["test_tasks"]).shape == (4, 2)  # 2D goal positions, one per per_task row
    per_task = torch.tensor(res["models"]["maml"]["per_task"])
    gain, ci = res["models"]["maml"]["gain_after_step_1"]
    assert gain == pytest.approx((per_task[:, -1] - per_task[:, 1]).mean().item()) and ci > 0
    assert res["models"]["oracle"]["gain_after_step_1"] is None
    # MAML minus each baseline, paired over the same tasks; the oracle's one value serves every step.
    oracle = torch.tensor(res["models"]["oracle"]["per_task"])
    for kind, other in (("pretrained", torch.tensor(res["models"]["pretrained"]["per_task"])), ("oracle", oracle)):
        diff = res["maml_minus"][kind]
        assert diff["mean"] == pytest.approx((per_task - other).mean(0).tolist())
        assert diff["ci95"] == pytest.approx((1.96 * (per_task - other).std(0) / 2).tolist())  # 4 tasks: √4 = 2
    assert "| MAML minus |" in (out / "eval.md").read_text()
    assert cli.main(["plot", str(out)]) == 0
    assert (out / "plots" / "return_vs_steps.png").exists()
    assert "note:" not in capsys.readouterr().out
    # Trained on after the evaluation: plotting the old eval.json says so.
    assert (
        cli.main(
            ["train", "rl-navigation2d-tiny", "--out", str(out), "--quiet", "--resume", "--set", "train.iterations=3"]
        )
        == 0
    )
    capsys.readouterr()
    assert cli.main(["plot", str(out)]) == 0
    assert "maml at iteration 2 (its checkpoint is now at 3)" in capsys.readouterr().out


def test_maml_learns_to_adapt_on_2d_navigation(tmp_path):
    # The paper's 2D navigation with a smaller policy and meta-batch for 15 meta-iterations: the
    # learned initialisation must adapt in one step, and beat random initialisation on the same
    # test tasks (paired), as in the paper's Figure 4.
    out = tmp_path / "nav"
    sets = [
        "models=[maml,random]",
        "train.iterations=15",
        "train.meta_batch_size=10",
        "train.trajectories=10",
        "train.checkpoint_every=15",
        "policy.hidden=[32,32]",
        "eval.num_tasks=20",
        "eval.trajectories=20",
        "eval.steps=1",
    ]
    args = ["train", "rl-navigation2d-official", "--out", str(out), "--quiet"]
    assert cli.main(args + [a for s in sets for a in ("--set", s)]) == 0
    assert cli.main(["eval", str(out)]) == 0
    res = json.loads((out / "eval.json").read_text())
    maml = torch.tensor(res["models"]["maml"]["per_task"])
    random_init = torch.tensor(res["models"]["random"]["per_task"])

    def above_zero(x):  # the paired mean's 95% interval lies above zero
        return (x.mean() - 1.96 * x.std() / math.sqrt(len(x))).item() > 0

    assert above_zero(maml[:, 1] - maml[:, 0])  # the one step helps
    assert above_zero(maml[:, 1] - random_init[:, 1])  # and beats random initialisation's step
    assert above_zero(maml[:, 0] - random_init[:, 0])  # the initialisation itself is nearer the goals


def test_time_limit_stops_with_a_resumable_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = ["train", "rl-navigation2d-tiny", "--out", str(out), "--quiet", "--set", "models=[maml]"]
    assert cli.main([*args, "--set", "train.time_limit=1e-9"]) == 130
    assert torch.load(out / "maml" / "checkpoint.pt", weights_only=False)["iteration"] == 1
    assert cli.main([*args, "--resume"]) == 0
    assert torch.load(out / "maml" / "checkpoint.pt", weights_only=False)["iteration"] == 2


def test_a_one_task_evaluation_writes_strict_json_and_plots(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "rl-navigation2d-tiny", "--out", str(out), "--quiet", "--set", "models=[maml]"]) == 0
    assert cli.main(["eval", str(out), "--set", "eval.num_tasks=1"]) == 0

    def reject(constant):
        raise ValueError(f"eval.json holds {constant}, which strict JSON readers reject")

    maml = json.loads((out / "eval.json").read_text(), parse_constant=reject)["models"]["maml"]
    assert len(maml["per_task"]) == 1 and all(math.isfinite(r) for r in maml["returns"])
    assert maml["ci95"] == [None] * len(maml["returns"])  # undefined for one task
    assert cli.main(["plot", str(out)]) == 0


def test_kept_checkpoints_are_the_weights_of_their_iteration_and_evaluate(tmp_path, capsys):
    args = ["train", "rl-navigation2d-tiny", "--quiet", "--set", "models=[maml,random]"]
    out = tmp_path / "run"
    keep = ["--set", "train.iterations=4", "--set", "train.keep_every=2", "--set", "train.checkpoint_every=3"]
    assert cli.main([*args, "--out", str(out), *keep]) == 0
    assert sorted(p.name for p in (out / "maml").glob("checkpoint*.pt")) == [
        "checkpoint-2.pt",
        "checkpoint-4.pt",
        "checkpoint.pt",
    ]
    assert not list((out / "random").glob("checkpoint-*.pt"))  # nothing to keep: it does not train
    # The kept iteration-2 weights are those of a run that stopped there.
    short = tmp_path / "short"
    assert cli.main([*args, "--out", str(short), "--set", "train.iterations=2"]) == 0
    kept = torch.load(out / "maml" / "checkpoint-2.pt", weights_only=False)
    final = torch.load(out / "maml" / "checkpoint.pt", weights_only=False)
    stopped = torch.load(short / "maml" / "checkpoint.pt", weights_only=False)
    assert kept["iteration"] == 2 and final["iteration"] == 4
    assert all(torch.equal(kept["learner"][k], stopped["learner"][k]) for k in kept["learner"])
    assert not all(torch.equal(kept["learner"][k], final["learner"][k]) for k in kept["learner"])

    # `eval --iteration 2` tests them (the random initialisation beside), apart from eval.json.
    assert cli.main(["eval", str(out), "--iteration", "2", "--set", "eval.num_tasks=2"]) == 0
    assert cli.main(["eval", str(short), "--set", "eval.num_tasks=2"]) == 0
    at2 = json.loads((out / "eval-iteration-2.json").read_text())["models"]
    assert at2["maml"]["iterations"] == 2 and set(at2) == {"maml", "random"}
    assert at2["maml"]["per_task"] == json.loads((short / "eval.json").read_text())["models"]["maml"]["per_task"]
    assert not (out / "eval.json").exists()
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--iteration", "3"]) == 2
    assert "no checkpoint of iteration 3 was kept for ['maml'] (kept: {'maml': [2, 4]})" in capsys.readouterr().err

    # Killed between writing checkpoint.pt and keeping it: the resume keeps it.
    (out / "maml" / "checkpoint-4.pt").unlink()
    assert cli.main([*args, "--out", str(out), *keep, "--resume"]) == 0
    assert (out / "maml" / "checkpoint-4.pt").read_bytes() == (out / "maml" / "checkpoint.pt").read_bytes()
    # Kept checkpoints without the run's checkpoint.pt are never mixed into a new run's.
    (out / "maml" / "checkpoint.pt").unlink()
    capsys.readouterr()
    assert cli.main([*args, "--out", str(out), *keep, "--resume"]) == 2
    assert "holds kept checkpoints of iterations [2, 4] but no checkpoint.pt" in capsys.readouterr().err


def test_eval_takes_the_settings_a_resume_changed_for_every_checkpoint(tmp_path):
    # The random baseline's checkpoint is written once, before the resume changes eval.num_tasks;
    # MAML's is written again after it. Both are evaluated as the run's config.yaml says now.
    out = tmp_path / "run"
    args = ["train", "rl-navigation2d-tiny", "--out", str(out), "--quiet", "--set", "models=[maml,random]"]
    assert cli.main([*args, "--set", "train.iterations=1"]) == 0
    assert cli.main([*args, "--resume", "--set", "train.iterations=2", "--set", "eval.num_tasks=3"]) == 0
    random_ckpt = torch.load(out / "random" / "checkpoint.pt", weights_only=False)
    assert random_ckpt["config"]["eval"]["num_tasks"] != 3  # the setting it was written with
    assert cli.main(["eval", str(out)]) == 0
    models = json.loads((out / "eval.json").read_text())["models"]
    assert [len(models[k]["per_task"]) for k in ("maml", "random")] == [3, 3]


def test_eval_chooses_step_sizes_on_validation_tasks(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "rl-navigation2d-tiny", "--out", str(out), "--quiet", "--set", "models=[maml,oracle]"]
    assert cli.main(args) == 0
    candidates = [0.05, 0.5, 2.0, 0.5]
    assert cli.main(["eval", str(out), "--set", f"eval.tune_inner_lrs={candidates}"]) == 0
    res = json.loads((out / "eval.json").read_text())
    maml = res["models"]["maml"]
    assert len(maml["inner_lrs"]) == res["eval"]["steps"] == len(maml["tuning"])
    for lr, row in zip(maml["inner_lrs"], maml["tuning"]):
        assert row[candidates.index(lr)] == max(row)  # each step takes its best candidate
        assert row[1] == row[3]  # the candidates of a step are tried on the same episodes
    assert res["models"]["oracle"]["tuning"] is None
    assert "chosen among" in (out / "eval.md").read_text()
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--set", "eval.tune_inner_lrs=[0.1]", "--set", "eval.tune_seed=1000"]) == 2
    assert "chosen on the test tasks" in capsys.readouterr().err
    assert cli.main(["eval", str(out), "--set", "train.iterations=3"]) == 2
    assert "only eval.* settings change" in capsys.readouterr().err


def test_eval_gives_each_model_its_own_step_sizes(tmp_path, capsys):
    """``eval.model_inner_lrs`` gives the models it names their own step sizes (as the official
    test scripts did): each model's returns equal an evaluation of that model alone with those
    sizes as ``eval.inner_lrs``, and the others keep ``eval.inner_lrs``."""
    out = tmp_path / "run"
    args = ["train", "rl-navigation2d-tiny", "--out", str(out), "--quiet", "--set", "models=[maml,random]"]
    assert cli.main(args) == 0
    assert cli.main(["eval", str(out), "--set", "eval.model_inner_lrs={random: [1.5, 0.7]}", "--name", "mixed"]) == 0
    mixed = json.loads((out / "eval-mixed.json").read_text())["models"]
    assert mixed["random"]["inner_lrs"] == [1.5, 0.7] and mixed["maml"]["inner_lrs"] == [0.1, 0.05]
    assert cli.main(["eval", str(out), "--models", "random", "--set", "eval.inner_lrs=[1.5, 0.7]", "--name", "r"]) == 0
    assert cli.main(["eval", str(out), "--models", "maml", "--name", "m"]) == 0
    for kind, name in (("random", "r"), ("maml", "m")):
        alone = json.loads((out / f"eval-{name}.json").read_text())["models"][kind]
        assert mixed[kind]["per_task"] == alone["per_task"], kind
    assert "random [1.5, 0.7]" in (out / "eval-mixed.md").read_text()
    # A schedule longer than the steps (the tiny preset takes 2): the sizes used are reported.
    assert cli.main(["eval", str(out), "--set", "eval.inner_lrs=[0.1, 0.05, 0.01, 0.3]", "--name", "long"]) == 0
    assert json.loads((out / "eval-long.json").read_text())["models"]["maml"]["inner_lrs"] == [0.1, 0.05]
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--set", "eval.model_inner_lrs={oracle: [0.1]}"]) == 2
    assert "'oracle' is not a model that takes steps" in capsys.readouterr().err
    assert cli.main(["eval", str(out), "--set", "eval.model_inner_lrs=[0.1]"]) == 2
    assert "eval.model_inner_lrs: expected a mapping" in capsys.readouterr().err
    assert cli.main(["eval", str(out), "--set", "eval.model_inner_lrs.random=[.nan]"]) == 2
    assert "eval.model_inner_lrs.random: expected non-negative step sizes" in capsys.readouterr().err


def test_trpo_never_runs_vmap_through_fused_normalisation():
    """A policy whose forward calls F.layer_norm: TRPO's auto strategy keeps the loop (vmap's
    second order is wrong there), an explicit vmap is refused."""

    class NormedPolicy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = GaussianMLPPolicy(2, 2, (8,)).double()
            self.scale = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))

        def forward(self, obs):
            return self.inner(torch.nn.functional.layer_norm(obs, (2,), self.scale))

    _, _, data = tiny_problem()
    maml = MAML(NormedPolicy(), reinforce_loss, inner_lr=0.1, strategy="loop")
    auto = MetaTRPO(maml)
    auto.strategy = "vmap"  # as auto picks on a GPU
    auto._ops_checked = False
    auto.policy_outputs(data, maml.params(), create_graph=True)
    assert auto.strategy == "loop"
    with pytest.raises(ValueError, match="layer_norm"):
        MetaTRPO(maml, strategy="vmap").policy_outputs(data, maml.params(), create_graph=True)


def test_trpo_under_vmap_refuses_what_the_engine_refuses():
    """TRPO's vmap path runs the inner step inside a torch.func transform, where ``adapt`` cannot
    record the policy's operations: it is checked before, as the meta-batch of supervised MAML is,
    so second order through weight normalisation (a wrong double backward) is refused here too."""

    class WeightNormed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = GaussianMLPPolicy(2, 2, (8,)).double()
            self.inner.mean[0] = torch.nn.utils.parametrizations.weight_norm(self.inner.mean[0])

        def forward(self, obs):
            return self.inner(obs)

    _, _, data = tiny_problem()
    maml = MAML(WeightNormed(), reinforce_loss, inner_lr=0.1)
    with pytest.raises(ValueError, match="weight_norm"):
        MetaTRPO(maml, strategy="vmap").policy_outputs(data, maml.params(), create_graph=True)
    first = MAML(WeightNormed(), reinforce_loss, inner_lr=0.1, first_order=True)
    MetaTRPO(first, strategy="vmap").policy_outputs(data, first.params(), create_graph=False)


def test_return_plot_draws_the_papers_values_where_given():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mamlkit import plots

    fig, ax = plt.subplots()
    series = {"MAML": ([1.0, 2.0, 3.0, 4.0], [0.1] * 4), "oracle": ([5.0], [0.1])}
    plots.steps_curves(ax, series, "return", reference={"MAML": [0.0, None, 2.5, 3.5], "oracle": [6.0]})
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["MAML (paper)"].get_xdata()) == [0, 2, 3]
    assert list(lines["MAML (paper)"].get_ydata()) == [0.0, 2.5, 3.5]
    assert lines["MAML (paper)"].get_color() == lines["MAML"].get_color()
    assert list(lines["oracle (paper)"].get_ydata()) == [6.0, 6.0]
    plt.close(fig)


@pytest.mark.parametrize("steps", [1, 3])
def test_the_gain_column_appears_only_with_a_step_after_the_first(steps):
    """With one test step there is no "N steps − 1 step" to show: no empty column, and every row
    has as many cells as the header."""
    from mamlkit.experiments.rl import format_table

    n = steps + 1
    model = {"returns": [1.0] * n, "ci95": [0.1] * n, "iterations": 5, "inner_lrs": [0.1]}
    if steps > 1:
        model["gain_after_step_1"] = [0.5, 0.2]
    results = {
        "models": {"maml": model, "oracle": {"returns": [2.0], "ci95": [0.1], "iterations": 5}},
        "eval": {"num_tasks": 4, "trajectories": 2, "inner_lrs": [0.1]},
        "paper": {"maml": [0.0] * n},
        "task_set": {"kind": "random", "seed": 0, "strata": ["all"], "counts": [4]},
    }
    table = [line for line in format_table(results).splitlines() if line.startswith("|")]
    assert ("− 1 step (paired)" in table[0]) == (steps > 1)
    assert len({line.count("|") for line in table}) == 1, table
