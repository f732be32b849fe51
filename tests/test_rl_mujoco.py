"""MuJoCo task environments: reward definitions, termination, the task API, and one tiny
training/evaluation run (skipped without ``gymnasium[mujoco]``)."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("mujoco")
gym = pytest.importorskip("gymnasium")

from mamlkit import cli  # noqa: E402
from mamlkit.rl import envs  # noqa: E402


@pytest.fixture(autouse=True)
def _mujoco_log_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Ant writes MUJOCO_LOG.TXT into the working directory


def run_steps(name, task, n=5, seed=0):
    env = gym.make(name)
    env.unwrapped.set_task(task)
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = rng.uniform(-1, 1, env.action_space.shape)
        out.append((a, *env.step(a)))
    return env, out


@pytest.mark.parametrize("goal", [0.3, 1.7])
def test_halfcheetah_velocity_reward(goal):
    _, steps = run_steps("mamlkit/HalfCheetahVel-v0", {"velocity": goal})
    for a, _, r, _, _, info in steps:
        assert r == pytest.approx(-abs(info["x_velocity"] - goal) - 0.05 * np.square(a).sum())


@pytest.mark.parametrize("direction", [-1.0, 1.0])
def test_halfcheetah_direction_reward(direction):
    _, steps = run_steps("mamlkit/HalfCheetahDir-v0", {"direction": direction})
    for a, _, r, _, _, info in steps:
        assert r == pytest.approx(direction * info["x_velocity"] - 0.05 * np.square(a).sum())


def test_ant_rewards_and_termination():
    _, steps = run_steps("mamlkit/AntVel-v0", {"velocity": 2.0})
    for a, obs, r, _, _, info in steps:
        assert obs.shape == (105,)
        ctrl = -0.005 * np.square(a).sum()
        assert info["reward_ctrl"] == pytest.approx(ctrl, rel=1e-5)
        assert info["reward_survive"] == pytest.approx(0.05)
        # the official AntVel adds 1 per step so that ending the episode early does not pay
        assert r == pytest.approx(-abs(info["x_velocity"] - 2.0) + 1 + 0.05 + ctrl + info["reward_contact"], rel=1e-5)
    _, steps = run_steps("mamlkit/AntDir-v0", {"direction": -1.0})
    for a, _, r, _, _, info in steps:
        assert info["reward_forward"] == pytest.approx(-info["x_velocity"])
        assert r == pytest.approx(
            -info["x_velocity"] + 0.05 - 0.005 * np.square(a).sum() + info["reward_contact"], rel=1e-5
        )
    env = gym.make("mamlkit/AntDir-v0")
    env.reset(seed=0)
    qpos, qvel = env.unwrapped.data.qpos.copy(), env.unwrapped.data.qvel.copy()
    qpos[2] = 1.5  # torso above the healthy range [0.2, 1.0]
    env.unwrapped.set_state(qpos, qvel)
    assert env.step(np.zeros(8))[2]


@pytest.mark.parametrize("name", ["mamlkit/HalfCheetahDir-v0", "mamlkit/AntVel-v0"])
def test_actions_are_clipped_to_the_bounds_before_the_step_and_its_costs(name):
    """rllab's normalize() clips what the policy sends: an action past the bounds acts and costs
    exactly as the clipped one."""
    rng = np.random.default_rng(1)
    a = 3 * rng.standard_normal((5, 8 if "Ant" in name else 6))
    runs = []
    for actions in (a, np.clip(a, -1, 1)):
        env = gym.make(name)
        env.reset(seed=0)
        runs.append([env.step(x)[:2] for x in actions])
    for (obs, r), (obs_c, r_c) in zip(*runs):
        np.testing.assert_array_equal(obs, obs_c)
        assert r == r_c


def test_simulation_step_is_the_official_codes():
    """rllab's models step 0.01 s (half-cheetah) and 0.02 s (ant) with no frame skip; gymnasium's 5
    can be asked for."""
    assert gym.make("mamlkit/HalfCheetahVel-v0").unwrapped.dt == pytest.approx(0.01)
    assert gym.make("mamlkit/AntDir-v0").unwrapped.dt == pytest.approx(0.02)
    assert gym.make("mamlkit/AntDir-v0", frame_skip=5).unwrapped.dt == pytest.approx(0.05)


def test_task_sampling_ranges():
    rng = np.random.default_rng(0)
    vel = [t["velocity"] for t in gym.make("mamlkit/AntVel-v0").unwrapped.sample_tasks(200, rng)]
    assert 0 <= min(vel) and max(vel) <= 3 and max(vel) > 2.5
    dirs = {t["direction"] for t in gym.make("mamlkit/HalfCheetahDir-v0").unwrapped.sample_tasks(50, rng)}
    assert dirs == {-1.0, 1.0}
    assert gym.spec("mamlkit/HalfCheetahVel-v0").max_episode_steps == 200
    assert envs.NAVIGATION in gym.registry


def test_tiny_halfcheetah_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    sets = [
        "models=[maml,oracle,random]",
        "env.horizon=5",
        "env.sim_threads=2",
        "policy.hidden=[8]",
        "train.iterations=1",
        "train.meta_batch_size=2",
        "train.trajectories=2",
        "algo.cg_iters=2",
        "eval.num_tasks=4",
        "eval.steps=1",
        "eval.trajectories=2",
    ]
    args = ["train", "rl-halfcheetah-vel", "--out", str(out), "--quiet"]
    assert cli.main(args + [x for s in sets for x in ("--set", s)]) == 0
    assert cli.main(["eval", str(out)]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["env"] == "halfcheetah_vel" and len(res["models"]["maml"]["returns"]) == 2
    # A balanced set: the goal thirds hold 2, 1 and 1 of the 4 tasks, each reported on its own.
    ts = res["task_set"]
    assert ts["kind"] == "balanced" and ts["counts"] == [2, 1, 1]
    strata = res["models"]["maml"]["strata"]
    assert [strata[label]["tasks"] for label in ts["strata"]] == [2, 1, 1]
    per_task = torch.tensor(res["models"]["maml"]["per_task"], dtype=torch.float64)
    third = [per_task[[i for i, h in enumerate(ts["stratum_of_task"]) if h == k]].mean(0) for k in range(3)]
    assert res["models"]["maml"]["returns"] == pytest.approx((sum(third) / 3).tolist())
    assert "By stratum" in (out / "eval.md").read_text() and "goal 0–0.667 (2)" in (out / "eval.md").read_text()


def test_halfcheetah_training_is_reproducible_and_resumes_exactly(tmp_path):
    """Full 200-step episodes (ill-conditioned baseline fits): the same run twice, and the run
    stopped after one iteration then resumed, end with bit-identical parameters."""
    sets = [
        "models=[maml]",
        "env.sim_threads=1",
        "policy.hidden=[16]",
        "train.meta_batch_size=3",
        "train.trajectories=10",
        "train.checkpoint_every=1",
        "algo.cg_iters=3",
    ]
    base = ["train", "rl-halfcheetah-dir", "--quiet"] + [x for s in sets for x in ("--set", s)]
    for name in ("a", "b"):
        assert cli.main([*base, "--out", str(tmp_path / name), "--set", "train.iterations=3"]) == 0
    assert cli.main([*base, "--out", str(tmp_path / "c"), "--set", "train.iterations=1"]) == 0
    first = torch.load(tmp_path / "c" / "maml" / "checkpoint.pt", weights_only=False)["learner"]
    assert cli.main([*base, "--out", str(tmp_path / "c"), "--resume", "--set", "train.iterations=3"]) == 0
    a = torch.load(tmp_path / "a" / "maml" / "checkpoint.pt", weights_only=False)["learner"]
    assert not all(torch.equal(a[k], first[k]) for k in a)  # the meta-updates moved the policy
    for name in ("b", "c"):
        b = torch.load(tmp_path / name / "maml" / "checkpoint.pt", weights_only=False)["learner"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
