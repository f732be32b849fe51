"""The batched MuJoCo sampler (``mamlkit.rl.mujoco_batch``): whole episodes against the gymnasium
environments of ``mujoco_tasks.py``, the rollout's bookkeeping, per-task parameters, seeding."""

import numpy as np
import pytest
import torch

pytest.importorskip("mujoco")
gym = pytest.importorskip("gymnasium")

from helpers import step_beside_references  # noqa: E402
from mamlkit.engine.functional import FunctionalModel  # noqa: E402
from mamlkit.rl import envs  # noqa: E402, F401  (registers the gymnasium environments)
from mamlkit.rl.config import RLEnvConfig  # noqa: E402
from mamlkit.rl.mujoco_batch import BatchedMujoco, batched_rollout  # noqa: E402
from mamlkit.rl.mujoco_sim import has_batch, has_capi  # noqa: E402
from mamlkit.rl.policy import GaussianMLPPolicy, TaskPolicy  # noqa: E402
from mamlkit.rl.tasks import make_tasks  # noqa: E402

GYM = {
    "halfcheetah_vel": ("mamlkit/HalfCheetahVel-v0", "velocity", 1.3),
    "halfcheetah_dir": ("mamlkit/HalfCheetahDir-v0", "direction", -1.0),
    "ant_vel": ("mamlkit/AntVel-v0", "velocity", 2.2),
    "ant_dir": ("mamlkit/AntDir-v0", "direction", 1.0),
}
BACKENDS = ["threads"] + (["batch"] if has_batch() else [])  # the half-cheetah's
ANT_BACKENDS = ["threads"] + (["capi"] if has_capi() else [])


@pytest.fixture(autouse=True)
def _mujoco_log_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MuJoCo's warnings go to MUJOCO_LOG.TXT in the working directory


def compare_episodes(name, backend, frame_skip=None, dtype=np.float64, n=3, steps=200, tasks=None):
    """Step ``n`` batched copies and ``n`` gymnasium envs from the same seeds with the same actions;
    return each copy's terminal step."""
    gym_id, key, value = GYM[name]
    tasks = [value] * n if tasks is None else tasks
    env = BatchedMujoco(name, n, frame_skip=frame_skip, threads=2, backend=backend)
    env.set_tasks(tasks)
    kwargs = {"frame_skip": frame_skip} if frame_skip else {}
    refs = [gym.make(gym_id, **kwargs) for _ in range(n)]
    for ref, task in zip(refs, tasks):
        ref.unwrapped.set_task({key: task})
    scale = 3.0 if "ant" in name else 1.5
    return step_beside_references(env, refs, [100 + i for i in range(n)], scale, steps, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["halfcheetah_vel", "halfcheetah_dir"])
def test_halfcheetah_matches_gymnasium(name, backend):
    ends = compare_episodes(name, backend, tasks=[0.4, 1.3, 2.0] if name.endswith("vel") else [1.0, -1.0, 1.0])
    assert ends == [None] * 3


@pytest.mark.parametrize("backend", ANT_BACKENDS)
@pytest.mark.parametrize("name", ["ant_vel", "ant_dir"])
def test_ant_matches_gymnasium_including_terminations(name, backend):
    ends = compare_episodes(name, backend, n=4)
    assert any(e is not None for e in ends), "no ant episode terminated: the test would not cover terminations"
    assert any(e is None for e in ends) or name == "ant_dir"


def test_float32_actions_and_frame_skip_override_match_gymnasium():
    # float32 actions as the sampler sends them: clipped in float32, costs in gymnasium's dtypes
    compare_episodes("halfcheetah_vel", BACKENDS[-1], dtype=np.float32, n=2, steps=50)
    compare_episodes("ant_vel", ANT_BACKENDS[-1], dtype=np.float32, n=2, steps=50)
    ends = compare_episodes("ant_dir", ANT_BACKENDS[-1], frame_skip=5, n=3, steps=60)
    assert all(e is not None for e in ends)  # gymnasium's 0.05 s step: a random ant falls fast


def test_ant_rejects_the_batch_backend():
    with pytest.raises(ValueError, match="cfrc_ext"):
        BatchedMujoco("ant_dir", 2, backend="batch")


def test_reset_from_one_generator():
    env = BatchedMujoco("halfcheetah_dir", 5, threads=1)
    a = env.reset(rng=np.random.default_rng(3))
    b = env.reset(rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    init = np.concatenate([env.init_qpos[1:], env.init_qvel])
    assert np.abs(a[:, :8] - init[:8]).max() <= 0.1 and a.std() > 0


def policy(obs_dim, act_dim, log_std=0.0, seed=0):
    torch.manual_seed(seed)
    fm = FunctionalModel(GaussianMLPPolicy(obs_dim, act_dim, hidden=(16, 16), init_log_std=log_std))
    return fm, {k: v.detach().clone() for k, v in fm.params().items()}


def test_rollout_mask_rewards_and_replay_in_gymnasium():
    env = BatchedMujoco("ant_vel", 12, frame_skip=5, threads=2)
    fm, params = policy(env.obs_dim, env.act_dim, log_std=0.5)
    tasks = torch.tensor([[0.5], [1.5], [2.5]])
    seeds = torch.tensor([7, 70, 700])
    ep = batched_rollout(env, fm, params, tasks, 4, 60, seeds)
    assert ep.obs.shape == (3, 4, 60, env.obs_dim) and ep.actions.shape == (3, 4, 60, 8)
    assert ep.rewards.shape == ep.mask.shape == (3, 4, 60)
    m = ep.mask
    assert set(m.unique().tolist()) <= {0.0, 1.0} and (m[..., 0] == 1).all()
    assert (m[..., 1:] <= m[..., :-1]).all()  # once ended, ended
    assert (ep.rewards[m == 0] == 0).all()
    lengths = m.sum(-1).long()
    assert (lengths < 60).any(), "no episode terminated"
    # replay each episode's actions in gymnasium from its seed: same rewards, same end
    for i in range(3):
        for j in range(4):
            ref = gym.make("mamlkit/AntVel-v0", frame_skip=5)
            ref.unwrapped.set_task({"velocity": float(tasks[i, 0])})
            o, _ = ref.reset(seed=int(seeds[i]) + j)
            for t in range(int(lengths[i, j])):
                np.testing.assert_allclose(ep.obs[i, j, t].numpy(), o, rtol=1e-6, atol=1e-6)
                o, r, term, _, _ = ref.step(ep.actions[i, j, t].numpy())
                assert ep.rewards[i, j, t].item() == pytest.approx(r, rel=1e-6, abs=1e-6)
                assert term == (t == lengths[i, j] - 1 and lengths[i, j] < 60)


def test_per_task_parameters_are_used_per_task_and_oracle_obs():
    env = BatchedMujoco("halfcheetah_vel", 6, threads=1)
    fm, a = policy(env.obs_dim + 1, env.act_dim, log_std=-30.0)  # oracle: the task is an input
    b = {k: v.clone() for k, v in a.items()}
    b["mean.4.bias"] += 3.0
    tasks = torch.tensor([[0.25], [1.75]])
    ep = batched_rollout(env, fm, [a, b], tasks, 3, 20, torch.tensor([0, 1]), oracle=True)
    assert (ep.obs[0, ..., -1] == 0.25).all() and (ep.obs[1, ..., -1] == 1.75).all()
    for i, p in enumerate([a, b]):
        mean, _ = fm(p, ep.obs[i])
        torch.testing.assert_close(ep.actions[i], mean, rtol=0, atol=1e-5)
    # the other task's parameters give other actions
    assert (fm(b, ep.obs[0])[0] - ep.actions[0]).abs().min() > 1.0


def test_task_policy_fast_path_matches_each_tasks_own_call():
    fm, base = policy(17, 6)
    params = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for _ in range(4)]
    fast = TaskPolicy(fm, params)
    assert fast.layers is not None
    slow = TaskPolicy(fm, params)
    slow.layers = None
    for obs, tasks in ((torch.randn(3, 5, 17), slice(1, 4)), (torch.randn(4, 2, 7, 17), slice(None))):
        ids = range(4)[tasks]
        expected = [torch.stack(x) for x in zip(*(fm(params[i], o) for i, o in zip(ids, obs)))]
        for way in (fast, slow):
            for x, y in zip(way(obs, tasks), expected):
                assert x.shape == y.shape
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    obs = torch.randn(4, 2, 7, 17)
    for x, y in zip(TaskPolicy(fm, base)(obs), fm(base, obs)):
        assert torch.equal(x, y)


def test_same_seed_same_episodes_whatever_the_other_tasks_and_chunks():
    env = BatchedMujoco("halfcheetah_dir", 9, threads=2)
    fm, params = policy(env.obs_dim, env.act_dim)
    tasks = torch.tensor([[1.0], [-1.0], [1.0]])

    def run(e, seeds, p=params, t=tasks):
        return batched_rollout(e, fm, p, t, 3, 30, torch.tensor(seeds))

    x, y, z = run(env, [5, 6, 7]), run(env, [5, 6, 7]), run(env, [5, 6, 8])
    for u, v in zip(x, y):
        assert torch.equal(u, v)
    assert torch.equal(x.actions[:2], z.actions[:2]) and not torch.equal(x.actions[2], z.actions[2])
    # A task's episodes depend on its own seed only, not on the other tasks of the call (what
    # lets torchrun's processes sample their shares): task 1 alone equals task 1 among three.
    # (Up to the float32 rounding of batched matmuls of another shape, which the dynamics amplify.)
    alone = run(env, [6], t=tasks[1:2])
    assert torch.equal(alone.obs[0, :, 0], x.obs[1, :, 0])
    for u, v in zip(alone, x):
        torch.testing.assert_close(u[0], v[1], rtol=1e-4, atol=1e-4)
    # fewer copies than episodes: tasks run in chunks; with zero noise the episodes are the same
    # up to the policy's float32 rounding (batched matmuls of other shapes), which the dynamics
    # amplify: compare the first steps
    _, det = policy(env.obs_dim, env.act_dim, log_std=float("-inf"))
    small = BatchedMujoco("halfcheetah_dir", 4, threads=1)  # one task (3 episodes) at a time
    big, chunked = run(env, [5, 6, 7], p=[det] * 3), run(small, [5, 6, 7], p=[det] * 3)
    assert torch.equal(big.obs[:, :, 0], chunked.obs[:, :, 0])
    torch.testing.assert_close(big.obs[:, :, :10], chunked.obs[:, :, :10], rtol=0, atol=1e-5)
    torch.testing.assert_close(big.rewards[:, :, :10], chunked.rewards[:, :, :10], rtol=0, atol=1e-5)


def test_task_family_builds_the_config_s_simulator():
    """env.frame_skip reaches the simulator (0 = the official step), and the family samples its
    task range."""
    for frame_skip, dt in ((0, 0.01), (5, 0.05)):
        family = make_tasks(RLEnvConfig(name="halfcheetah_dir", horizon=3, frame_skip=frame_skip, sim_threads=1))
        fm, params = policy(family.obs_dim, family.act_dim)
        ep = family.rollout(fm, params, torch.tensor([[1.0]]), 2, torch.tensor([3]))
        assert ep.obs.shape == (1, 2, 3, 17) and family._sim.dt == pytest.approx(dt)
    vel = make_tasks(RLEnvConfig(name="ant_vel", sim_threads=1)).sample(500, torch.Generator().manual_seed(0))
    assert 0 <= vel.min() and vel.max() <= 3 and vel.max() > 2.5


def test_linear_baseline_is_rllabs_fit_and_the_same_on_every_call():
    """Half-cheetah features make ill-conditioned normal equations (condition ~1e9): the fit must
    agree with rllab's numpy least squares and give bit-identical values on every call, whatever
    was allocated in between (torch's default CPU solver did not; RL amplified its last bits)."""
    import numpy as np

    from mamlkit.rl.baseline import discounted_returns, features, fit_linear_baseline

    env = BatchedMujoco("halfcheetah_vel", 80, threads=1)
    fm, params = policy(env.obs_dim, env.act_dim)
    ep = batched_rollout(env, fm, params, torch.tensor([[0.3], [0.9], [1.4], [1.9]]), 20, 200, torch.arange(4))
    returns = discounted_returns(ep.rewards, ep.mask, 0.99)
    for obs, ret, mask in zip(ep.obs, returns, ep.mask):
        first = fit_linear_baseline(obs, ret, mask)
        f = features(obs.double()).reshape(-1, 2 * obs.shape[-1] + 4).numpy()
        w = np.linalg.lstsq(f.T @ f + 1e-5 * np.eye(f.shape[1]), f.T @ ret.double().reshape(-1).numpy(), rcond=None)[0]
        np.testing.assert_allclose(first.reshape(-1).numpy(), f @ w, rtol=0, atol=1e-3)
        for k in range(30):
            _ = [torch.empty(j * 13 + k) for j in range(20)]  # other allocations in between
            assert torch.equal(fit_linear_baseline(obs.clone(), ret.clone(), mask), first)
