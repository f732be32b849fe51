"""Test-task sets of the RL evaluation: balanced sets keep their invariants, random sets are the
draw every earlier evaluation used, and the stratified interval is the right width."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mamlkit.config import ConfigError
from mamlkit.experiments import load_config
from mamlkit.rl.families import MUJOCO
from mamlkit.rl.navigation import sample_goals
from mamlkit.rl.task_sets import make_task_set, per_stratum, stratified_mean_ci
from mamlkit.training import mean_ci


class _Uniform:
    """The MuJoCo families' own uniform draw (``MujocoTasks.sample``), without a simulator."""

    def __init__(self, name):
        self.high = MUJOCO[name].high

    def sample(self, n, g):
        u = torch.rand(n, 1, generator=g)
        return u * self.high if self.high is not None else torch.where(u < 0.5, -1.0, 1.0)


class _Navigation:
    def sample(self, n, g):
        return sample_goals(n, g, -0.5, 0.5)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["halfcheetah_vel", "ant_vel"]), n=st.integers(3, 400), seed=st.integers(0, 2**31))
def test_a_balanced_velocity_set_fills_each_third_equally(name, n, seed):
    ts = make_task_set(name, _Uniform(name), n, seed)
    high = MUJOCO[name].high
    counts = ts.counts()
    assert sum(counts) == n == len(ts.tasks) and max(counts) - min(counts) <= 1
    goals = ts.tasks[:, 0].double()
    for h in range(3):
        inside = goals[ts.stratum == h]
        assert (inside >= high * h / 3 - 1e-6).all() and (inside <= high * (h + 1) / 3 + 1e-6).all()
    assert ts.weights == (1 / 3, 1 / 3, 1 / 3)
    again = make_task_set(name, _Uniform(name), n, seed)
    assert torch.equal(again.tasks, ts.tasks)  # fixed by its seed


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(["halfcheetah_dir", "ant_dir"]), n=st.integers(2, 300))
def test_a_balanced_direction_set_asks_for_each_direction_equally(name, n):
    ts = make_task_set(name, _Uniform(name), n, 1000)
    backward, forward = (ts.tasks[:, 0] == -1).sum().item(), (ts.tasks[:, 0] == 1).sum().item()
    assert backward + forward == n and abs(backward - forward) <= 1
    assert torch.equal(ts.tasks[:, 0], torch.where(ts.stratum == 0, -1.0, 1.0))


def test_balanced_velocity_goals_are_uniform_within_their_third():
    ts = make_task_set("ant_vel", _Uniform("ant_vel"), 30000, 7)
    for h in range(3):
        inside = ts.tasks[ts.stratum == h, 0].double() - h  # ant: high 3, so each third is 1 wide
        assert abs(inside.mean().item() - 0.5) < 0.01 and abs(inside.var().item() - 1 / 12) < 0.003


@pytest.mark.parametrize("name", ["halfcheetah_vel", "ant_dir"])
def test_a_random_set_is_the_draw_of_earlier_evaluations(name):
    family = _Uniform(name)
    ts = make_task_set(name, family, 40, 1000, "random")
    assert torch.equal(ts.tasks, family.sample(40, torch.Generator().manual_seed(1000)))
    assert ts.labels == ("all",) and ts.counts() == [40]


def test_navigation_goals_are_random_in_a_balanced_set_too():
    ts = make_task_set("navigation2d", _Navigation(), 50, 3)
    assert torch.equal(ts.tasks, sample_goals(50, torch.Generator().manual_seed(3), -0.5, 0.5))
    assert ts.labels == ("all",)


def test_one_stratum_gives_the_plain_mean_and_interval():
    values = torch.randn(37, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5 + 2
    ts = make_task_set("navigation2d", _Navigation(), 37, 0)
    mean, ci = stratified_mean_ci(values, ts)
    ref_mean, ref_ci = mean_ci(values)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(ci, ref_ci, rtol=1e-12, atol=0)


def test_stratified_estimate_against_a_by_hand_computation():
    ts = make_task_set("ant_vel", _Uniform("ant_vel"), 8, 0)  # shares 3, 3, 2
    values = torch.tensor([1.0, 2.0, 6.0, 10.0, 10.0, 13.0, -4.0, 0.0])
    parts = [[1.0, 2.0, 6.0], [10.0, 10.0, 13.0], [-4.0, 0.0]]
    means = [sum(p) / len(p) for p in parts]
    variances = [sum((x - m) ** 2 for x in p) / (len(p) - 1) for p, m in zip(parts, means)]
    mean, ci = stratified_mean_ci(values, ts)
    assert mean.item() == pytest.approx(sum(means) / 3)
    assert ci.item() == pytest.approx(1.96 * math.sqrt(sum(v / 9 / len(p) for v, p in zip(variances, parts))))
    by = per_stratum(values, ts)
    assert [by[label]["tasks"] for label in ts.labels] == [3, 3, 2]
    assert [by[label]["returns"] for label in ts.labels] == pytest.approx(means)


def test_the_stratified_interval_covers_the_true_mean_about_95_percent_of_the_time():
    # Returns that depend strongly on the goal (as the fastest goals are the hardest): the
    # balanced set's interval must cover the distribution's mean ~95% of the time, and be
    # narrower than a plain interval over a random draw of as many tasks.
    g = torch.Generator().manual_seed(0)

    def returns(goals):
        return -60 * goals[:, 0] ** 2 + 5 * torch.randn(len(goals), generator=g)

    true_mean = -60 * 3.0**2 / 3  # E[-60 v^2], v ~ U[0, 3]
    covered, widths, plain_widths = 0, [], []
    for seed in range(600):
        ts = make_task_set("ant_vel", _Uniform("ant_vel"), 30, seed)
        mean, ci = stratified_mean_ci(returns(ts.tasks), ts)
        covered += abs(mean.item() - true_mean) <= ci.item()
        widths.append(ci.item())
        plain = make_task_set("ant_vel", _Uniform("ant_vel"), 30, seed, "random")
        plain_widths.append(mean_ci(returns(plain.tasks))[1].item())
    assert 0.92 <= covered / 600 <= 0.975
    assert sum(widths) < 0.6 * sum(plain_widths)


def test_a_balanced_set_needs_a_task_per_stratum():
    with pytest.raises(ConfigError, match=r"eval.num_tasks=2: a balanced set of halfcheetah_vel tasks has 3 strata"):
        load_config("rl-halfcheetah-vel", ["eval.num_tasks=2"])
    assert load_config("rl-halfcheetah-vel", ["eval.num_tasks=2", "eval.task_set=random"]).eval.num_tasks == 2
    with pytest.raises(ConfigError, match="task_set"):
        load_config("rl-ant-dir", ["eval.task_set=stratified"])
