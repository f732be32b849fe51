"""The paper variant of the MuJoCo families (``env.variant: paper``): rllab's environments as the
official code defined them. The batched sampler against the ``*PaperEnv`` classes (whole episodes,
terminations, per-task parameters, seeds), and the definitions themselves, independently of both:
models attribute by attribute against rllab's files, observations, rewards and ends against rllab's
formulas applied to a fresh MjData rebuilt from the raw state, the centre-of-mass velocity by two
roads, the ant's gear 150 against rllab's gear 1 behind ``normalize``, resets, the config setting
and a tiny training run."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

mujoco = pytest.importorskip("mujoco")
gym = pytest.importorskip("gymnasium")

from gymnasium.envs.mujoco.mujoco_env import expand_model_path  # noqa: E402

from helpers import step_beside_references  # noqa: E402
from mamlkit import cli  # noqa: E402
from mamlkit.config import ConfigError  # noqa: E402
from mamlkit.engine.functional import FunctionalModel  # noqa: E402
from mamlkit.experiments import load_config  # noqa: E402
from mamlkit.rl import envs  # noqa: E402, F401  (registers the environments)
from mamlkit.rl.config import RLEnvConfig  # noqa: E402
from mamlkit.rl.families import MUJOCO, XML, paper_model_path  # noqa: E402
from mamlkit.rl.mujoco_batch import BatchedMujoco, batched_rollout  # noqa: E402
from mamlkit.rl.mujoco_sim import has_capi, initial_qpos, load_model  # noqa: E402
from mamlkit.rl.policy import GaussianMLPPolicy  # noqa: E402
from mamlkit.rl.tasks import make_tasks  # noqa: E402

TASK = {"halfcheetah_vel": 1.3, "halfcheetah_dir": -1.0, "ant_vel": 2.2, "ant_dir": 1.0}
BACKENDS = ["threads"] + (["capi"] if has_capi() else [])


@pytest.fixture(autouse=True)
def _mujoco_log_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MuJoCo's warnings go to MUJOCO_LOG.TXT in the working directory


def policy(obs_dim, act_dim, log_std=0.0, seed=0):
    torch.manual_seed(seed)
    fm = FunctionalModel(GaussianMLPPolicy(obs_dim, act_dim, hidden=(16, 16), init_log_std=log_std))
    return fm, {k: v.detach().clone() for k, v in fm.params().items()}


def make(name, task=None, **kwargs):
    env = gym.make(MUJOCO[name].env_id_of("paper"), **kwargs)
    if task is not None:
        env.unwrapped.set_task({MUJOCO[name].key: task})
    return env


def compare_episodes(name, backend, n=3, steps=200, tasks=None, dtype=np.float64, scale=None, frame_skip=None):
    """Step ``n`` batched copies of the paper variant and ``n`` ``*PaperEnv`` environments from the
    same seeds with the same actions; return each copy's terminal step."""
    tasks = [TASK[name]] * n if tasks is None else tasks
    env = BatchedMujoco(name, n, frame_skip=frame_skip, threads=2, backend=backend, variant="paper")
    env.set_tasks(tasks)
    kwargs = {"frame_skip": frame_skip} if frame_skip else {}
    refs = [make(name, t, **kwargs) for t in tasks]
    scale = scale or (3.0 if "ant" in name else 1.5)
    return step_beside_references(env, refs, [100 + i for i in range(n)], scale, steps, dtype)


# --- the batched sampler reproduces the environment classes ------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["halfcheetah_vel", "halfcheetah_dir"])
def test_paper_halfcheetah_batch_matches_the_env_class(name, backend):
    tasks = [0.4, 1.3, 2.0] if name.endswith("vel") else [1.0, -1.0, 1.0]
    assert compare_episodes(name, backend, tasks=tasks) == [None] * 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["ant_vel", "ant_dir"])
def test_paper_ant_batch_matches_the_env_class_including_terminations(name, backend):
    ends = compare_episodes(name, backend, n=4, tasks=[0.5, 2.2, 1.0, 3.0] if name == "ant_vel" else None)
    assert any(e is not None for e in ends), "no ant episode terminated: the test would not cover terminations"


def test_paper_float32_actions_and_frame_skip_override_match_the_env_class():
    compare_episodes("halfcheetah_dir", BACKENDS[-1], dtype=np.float32, n=2, steps=40)
    compare_episodes("ant_vel", BACKENDS[-1], dtype=np.float32, n=2, steps=40)
    compare_episodes("ant_dir", BACKENDS[-1], n=2, steps=30, frame_skip=2)


def test_paper_variant_refuses_the_batch_backend_and_unknown_variants():
    with pytest.raises(ValueError, match="capi' or 'threads"):
        BatchedMujoco("halfcheetah_vel", 2, backend="batch", variant="paper")
    with pytest.raises(ValueError, match="'gym', 'paper'"):
        BatchedMujoco("ant_dir", 2, variant="rllab")


def test_paper_rollout_replays_in_the_env_class_and_per_task_parameters():
    env = BatchedMujoco("ant_vel", 6, threads=2, variant="paper")
    fm, a = policy(env.obs_dim, env.act_dim, log_std=-30.0)  # actions = the mean (to float32 rounding)
    b = {k: v.clone() for k, v in a.items()}
    b["mean.4.bias"] += 1.0
    tasks, seeds = torch.tensor([[0.5], [2.5]]), torch.tensor([7, 70])
    ep = batched_rollout(env, fm, [a, b], tasks, 3, 40, seeds)
    assert ep.obs.shape == (2, 3, 40, 125) and ep.actions.shape == (2, 3, 40, 8)
    for i, p in enumerate([a, b]):  # each task's actions come from its own parameters
        torch.testing.assert_close(ep.actions[i], fm(p, ep.obs[i])[0], rtol=0, atol=1e-5)
    assert (fm(b, ep.obs[0])[0] - ep.actions[0]).abs().min() > 0.1
    # each episode replayed in the env class from its seed: the same observations, rewards, end
    lengths = ep.mask.sum(-1).long()
    for i in range(2):
        for j in range(3):
            ref = make("ant_vel", float(tasks[i, 0]))
            o, _ = ref.reset(seed=int(seeds[i]) + j)
            for t in range(int(lengths[i, j])):
                np.testing.assert_allclose(ep.obs[i, j, t].numpy(), o, rtol=1e-6, atol=1e-6)
                o, r, term, _, _ = ref.step(ep.actions[i, j, t].numpy())
                assert ep.rewards[i, j, t].item() == pytest.approx(r, rel=1e-6, abs=1e-6)
                assert term == (t == lengths[i, j] - 1 and lengths[i, j] < 40)


def test_paper_same_seed_same_episodes_whatever_the_other_tasks():
    env = BatchedMujoco("halfcheetah_dir", 9, threads=2, variant="paper")
    fm, params = policy(env.obs_dim, env.act_dim)
    tasks = torch.tensor([[1.0], [-1.0], [1.0]])

    def run(seeds, t=tasks):
        return batched_rollout(env, fm, params, t, 3, 20, torch.tensor(seeds))

    x, y, z = run([5, 6, 7]), run([5, 6, 7]), run([5, 6, 8])
    for u, v in zip(x, y):
        assert torch.equal(u, v)
    assert torch.equal(x.actions[:2], z.actions[:2]) and not torch.equal(x.actions[2], z.actions[2])
    alone = run([6], t=tasks[1:2])
    assert torch.equal(alone.obs[0, :, 0], x.obs[1, :, 0])  # the same initial states from the same seed


def test_task_family_builds_the_paper_simulator_from_the_config():
    for name, dim, dt in (("halfcheetah_vel", 20, 0.01), ("ant_dir", 125, 0.02)):
        family = make_tasks(RLEnvConfig(name=name, horizon=3, sim_threads=1, variant="paper"))
        assert family.obs_dim == dim
        fm, params = policy(family.obs_dim, family.act_dim)
        ep = family.rollout(fm, params, torch.tensor([[1.0]]), 2, torch.tensor([3]))
        assert ep.obs.shape == (1, 2, 3, dim) and family._sim.dt == pytest.approx(dt)
        assert family._sim.variant == "paper"
    assert make_tasks(RLEnvConfig(name="ant_dir", sim_threads=1)).obs_dim == 105  # gym: unchanged


# --- the definitions ---------------------------------------------------------------------------


def test_paper_observation_sizes_and_contents():
    cheetah = make("halfcheetah_vel", 1.0)
    o, _ = cheetah.reset(seed=0)
    d, torso = cheetah.unwrapped.data, cheetah.unwrapped.torso
    assert o.shape == cheetah.observation_space.shape == (20,)
    np.testing.assert_array_equal(o, np.concatenate([d.qpos[1:], d.qvel, d.subtree_com[torso]]))
    ant = make("ant_dir", 1.0)
    o, _ = ant.reset(seed=0)
    o, *_ = ant.step(np.zeros(8))
    u = ant.unwrapped
    d, torso = u.data, u.torso
    assert o.shape == ant.observation_space.shape == (125,)
    # rllab's order: qpos (root x, y included), qvel, clipped cfrc_ext of every body (world too),
    # the torso's rotation matrix, its subtree centre of mass
    parts = np.split(o, np.cumsum([15, 14, 6 * 14, 9]))
    np.testing.assert_array_equal(parts[0], d.qpos)
    np.testing.assert_array_equal(parts[1], d.qvel)
    np.testing.assert_array_equal(parts[2], np.clip(d.cfrc_ext, -1, 1).ravel())
    np.testing.assert_array_equal(parts[3], d.xmat[torso])
    np.testing.assert_array_equal(parts[4], d.subtree_com[torso])
    assert np.abs(parts[2]).max() > 0, "contact forces after the step: the feet touch the floor"
    # the centre of mass is the whole robot's: the mass-weighted mean of the bodies' centres
    m = u.model
    com = (m.body_mass[1:, None] * d.xipos[1:]).sum(0) / m.body_mass[1:].sum()
    np.testing.assert_allclose(parts[4], com, rtol=0, atol=1e-12)


def test_paper_ant_model_is_rllabs():
    m = load_model(paper_model_path("ant"))
    assert m.opt.timestep == 0.02 and m.opt.integrator == mujoco.mjtIntegrator.mjINT_RK4
    q0, init = m.qpos0, initial_qpos(m)
    assert q0[2] == pytest.approx(0.75) and init[2] == pytest.approx(0.55)  # starts lower
    np.testing.assert_array_equal(init[3:7], [1, 0, 0, 0])
    np.testing.assert_array_equal(init[7::2], 0)  # hips straight
    np.testing.assert_array_equal(init[8::2], [1, -1, -1, 1])  # ankles bent, 1 rad each
    ankles = m.jnt_range[2::2]
    assert (ankles[:, 0] <= init[8::2]).all() and (init[8::2] <= ankles[:, 1]).all()  # inside their ranges
    assert not ((ankles[:, 0] <= 0) & (0 <= ankles[:, 1])).any()  # qpos0's straight ankles are not
    # softer contacts: solimp 0.8 0.8 0.01 on every geom (MuJoCo's default 0.9 0.95 0.001)
    np.testing.assert_allclose(m.geom_solimp[:, :3], np.tile([0.8, 0.8, 0.01], (m.ngeom, 1)))
    np.testing.assert_allclose(m.geom_solref, np.tile([0.02, 1.0], (m.ngeom, 1)))
    # the policy's [-1, 1] is rllab's normalize() range: 150 N m at full action
    np.testing.assert_array_equal(m.actuator_ctrlrange, np.tile([-1.0, 1.0], (8, 1)))
    np.testing.assert_array_equal(m.actuator_gear[:, 0], 150)
    # rllab's vendor/mujoco_models/ant.xml, attribute by attribute: geom defaults condim 3,
    # conaffinity 0 (the floor 1), margin 0.01, friction 1 0.5 0.5; joints armature 1 and damping 1
    # (the free root 0 and 0), limited; motors on hip_4, ankle_4, hip_1 ... ankle_3
    floor = m.geom("floor").id
    assert (m.geom_condim == 3).all() and (m.geom_contype == 1).all()
    np.testing.assert_array_equal(m.geom_conaffinity, [1 if g == floor else 0 for g in range(m.ngeom)])
    robot = np.arange(m.ngeom) != floor
    np.testing.assert_allclose(m.geom_margin[robot], 0.01)
    np.testing.assert_allclose(m.geom_friction[robot], np.tile([1.0, 0.5, 0.5], (m.ngeom - 1, 1)))
    np.testing.assert_array_equal(m.dof_armature, [0] * 6 + [1] * 8)
    np.testing.assert_array_equal(m.dof_damping, [0] * 6 + [1] * 8)
    np.testing.assert_array_equal(m.jnt_limited, [0] + [1] * 8)
    np.testing.assert_allclose(np.degrees(m.jnt_range[1::2]), np.tile([-30, 30], (4, 1)))
    np.testing.assert_allclose(np.degrees(m.jnt_range[2::2]), [[30, 70], [-70, -30], [-70, -30], [30, 70]])
    names = [m.joint(int(j)).name for j in m.actuator_trnid[:, 0]]
    assert names == ["hip_4", "ankle_4", "hip_1", "ankle_1", "hip_2", "ankle_2", "hip_3", "ankle_3"]
    assert (m.actuator_ctrllimited == 1).all()
    assert m.body_mass[m.body("torso").id] == pytest.approx(5.0 * 4 / 3 * np.pi * 0.25**3)  # density 5
    env = make("ant_dir", 1.0).unwrapped
    assert env.dt == 0.02 and env.frame_skip == 1
    # the bodies are gymnasium's Ant-v5 bodies: the same masses, inertias, joints and geoms
    g = load_model(expand_model_path(XML["ant"]))
    for field in ("body_mass", "body_inertia", "body_pos", "jnt_range", "jnt_axis", "geom_size", "actuator_trnid"):
        np.testing.assert_allclose(getattr(m, field), getattr(g, field), rtol=0, atol=1e-12, err_msg=field)


def test_paper_halfcheetah_model_is_rllabs():
    m = load_model(paper_model_path("halfcheetah"))
    assert m.opt.timestep == 0.01 and m.opt.integrator == mujoco.mjtIntegrator.mjINT_EULER
    assert m.body_mass.sum() == pytest.approx(14.0)
    np.testing.assert_array_equal(initial_qpos(m), m.qpos0)  # no init_qpos in rllab's file
    g = load_model(expand_model_path(XML["halfcheetah"]))  # gymnasium's file descends from rllab's
    for field in (
        "body_mass",
        "body_inertia",
        "jnt_range",
        "jnt_stiffness",
        "dof_damping",
        "dof_armature",
        "geom_size",
        "geom_solimp",
        "geom_friction",
        "actuator_gear",
        "actuator_ctrlrange",
        "body_pos",
        "geom_pos",
        "geom_quat",
        "geom_solref",
        "jnt_solref",
        "jnt_solimp",
        "jnt_axis",
    ):
        np.testing.assert_allclose(getattr(m, field), getattr(g, field), rtol=0, atol=1e-12, err_msg=field)
    # and rllab's vendor/mujoco_models/half_cheetah.xml, attribute by attribute
    np.testing.assert_allclose(m.opt.gravity, [0, 0, -9.81])
    np.testing.assert_array_equal(m.actuator_gear[:, 0], [120, 90, 60, 120, 60, 30])
    np.testing.assert_array_equal(m.jnt_stiffness, [0, 0, 0, 240, 180, 120, 180, 120, 60])
    np.testing.assert_array_equal(m.dof_damping, [0, 0, 0, 6, 4.5, 3, 4.5, 3, 1.5])
    np.testing.assert_array_equal(m.dof_armature, [0, 0, 0] + [0.1] * 6)
    np.testing.assert_allclose(m.geom_friction[1:], np.tile([0.4, 0.1, 0.1], (m.ngeom - 1, 1)))
    np.testing.assert_allclose(m.geom_solimp[1:, :3], np.tile([0.0, 0.8, 0.01], (m.ngeom - 1, 1)))
    np.testing.assert_allclose(m.jnt_solimp[3:, :3], np.tile([0.0, 0.8, 0.03], (6, 1)))
    ranges = [[-0.52, 1.05], [-0.785, 0.785], [-0.4, 0.785], [-1, 0.7], [-1.2, 0.87], [-0.5, 0.5]]
    np.testing.assert_allclose(m.jnt_range[3:], ranges)
    assert make("halfcheetah_dir", 1.0).unwrapped.dt == 0.01


def rllab_comvel(model, qpos, qvel, body):
    """rllab's ``get_body_comvel`` recomputed from scratch on a fresh MjData: ``mj_objectVelocity`` of
    every body (world-oriented, at its centre of mass), momenta summed up the tree, over the mass."""
    d = mujoco.MjData(model)
    d.qpos[:], d.qvel[:] = qpos, qvel
    mujoco.mj_forward(model, d)
    vel = np.zeros((model.nbody, 6))
    for i in range(model.nbody):
        mujoco.mj_objectVelocity(model, d, mujoco.mjtObj.mjOBJ_BODY, i, vel[i], 0)
    mass = model.body_mass.copy()
    momentum = vel[:, 3:] * mass[:, None]
    for i in range(model.nbody - 1, 0, -1):
        p = model.body_parentid[i]
        momentum[p] += momentum[i]
        mass[p] += mass[i]
    jac = np.zeros((3, model.nv))  # and, by another road, the Jacobian of the subtree's centre of mass
    mujoco.mj_jacSubtreeCom(model, d, jac, body)
    np.testing.assert_allclose(momentum[body] / mass[body], jac @ qvel, rtol=1e-9, atol=1e-9)
    return momentum[body] / mass[body], d.subtree_com[body].copy()


@pytest.mark.parametrize("name", list(MUJOCO))
def test_the_reward_velocity_is_the_torso_centre_of_mass_velocity(name):
    env = make(name, TASK[name])
    u = env.unwrapped
    env.reset(seed=3)
    rng = np.random.default_rng(3)
    v_before, com_before = rllab_comvel(u.model, u.data.qpos, u.data.qvel, u.torso)
    for _ in range(15):
        a = rng.uniform(-1, 1, env.action_space.shape)
        _, r, term, _, info = env.step(a)
        v, com = rllab_comvel(u.model, u.data.qpos, u.data.qvel, u.torso)
        assert info["x_velocity"] == pytest.approx(v[0], rel=1e-10, abs=1e-12)
        # and the centre of mass moves at about that speed over the step (the trapezoid rule)
        moved = (com[0] - com_before[0]) / u.dt
        assert moved == pytest.approx((v[0] + v_before[0]) / 2, abs=0.05 + 0.1 * abs(v[0]))
        v_before, com_before = v, com
        if name.startswith("halfcheetah"):
            costs = 0.05 * np.square(a).sum()
        else:  # control, contact, less the survival bonus
            costs = 0.005 * np.square(a).sum() + 5e-4 * np.square(np.clip(u.data.cfrc_ext, -1, 1)).sum() - 0.05
        if name.endswith("vel"):
            forward = -abs(v[0] - TASK[name]) + (1.0 if name == "ant_vel" else 0.0)
        else:
            forward = TASK[name] * v[0]
        assert r == pytest.approx(forward - costs, rel=1e-9, abs=1e-9)
        if term:
            break


def rllab_fresh(model, qpos, qvel, ctrl):
    """A new MjData at ``(qpos, qvel)`` with ``ctrl`` applied, then ``mj_forward`` and the contact
    forces: the state rllab's ``forward_dynamics`` (1.31's forward) left behind, rebuilt from the
    raw state alone (no simulator history)."""
    f = mujoco.MjData(model)
    f.qpos[:], f.qvel[:], f.ctrl[:] = qpos, qvel, ctrl
    mujoco.mj_forward(model, f)
    mujoco.mj_rnePostConstraint(model, f)
    return f


def rllab_obs(name, model, f, body):
    """rllab's ``get_current_obs`` written out from the raw arrays: half-cheetah ``qpos[1:], qvel,
    com_subtree[torso]``; ant ``qpos, qvel, clip(cfrc_ext, -1, 1), xmat[torso], com_subtree[torso]``."""
    if name.startswith("halfcheetah"):
        return np.concatenate([f.qpos.flatten()[1:], f.qvel.flat, f.subtree_com[body].flat])
    parts = [f.qpos.flat, f.qvel.flat, np.clip(f.cfrc_ext, -1, 1).flat, f.xmat[body].flat, f.subtree_com[body]]
    return np.concatenate(parts).reshape(-1)


def rllab_step(name, goal, model, f, body, policy_action):
    """rllab's ``step`` behind ``normalize`` on rllab's own bounds (the ant's ±150 with gear 1, the
    half-cheetah's ±1): the action scaled and clipped by ``normalize``, then the reward and ``done``
    of ``AntEnvRand``/``AntEnvRandDirec``/``HalfCheetahEnvRand``/``HalfCheetahEnvRandDirec``."""
    ant = name.startswith("ant")
    lb, ub = (np.full(8, -150.0), np.full(8, 150.0)) if ant else (np.full(6, -1.0), np.full(6, 1.0))
    action = np.clip(lb + (policy_action + 1.0) * 0.5 * (ub - lb), lb, ub)
    comvel, _ = rllab_comvel(model, f.qpos, f.qvel, body)
    if ant:
        if name.endswith("vel"):
            forward = -np.abs(comvel[0] - goal) + 1.0
        else:
            forward = goal * comvel[0]
        ctrl_cost = 0.5 * 1e-2 * np.sum(np.square(action / ((ub - lb) * 0.5)))
        contact_cost = 0.5 * 1e-3 * np.sum(np.square(np.clip(f.cfrc_ext, -1, 1)))
        reward = forward - ctrl_cost - contact_cost + 0.05
        state = np.concatenate([f.qpos.flat, f.qvel.flat])
        done = not (np.isfinite(state).all() and 0.2 <= state[2] <= 1.0)
        return float(reward), done
    action = np.clip(action, lb, ub)
    ctrl_cost = 1e-1 * 0.5 * np.sum(np.square(action))
    run_cost = np.abs(comvel[0] - goal) if name.endswith("vel") else goal * -1 * comvel[0]
    return -(ctrl_cost + run_cost), False


@pytest.mark.parametrize("name", list(MUJOCO))
def test_paper_env_matches_rllab_recomputed_from_the_raw_state(name):
    """Each observation, reward and end of the ``*PaperEnv`` against rllab's definitions applied to
    a fresh MjData built from the state alone, with actions well past the bounds: so an observation
    or a contact force taken before the step's ``mj_forward``, a cost on the unclipped action or a
    wrong order of the parts fails here, not only in the batched sampler that copies the class."""
    goal = TASK[name]
    env = make(name, goal)
    u = env.unwrapped
    m, body = u.model, u.torso
    o, _ = env.reset(seed=5)
    f = rllab_fresh(m, u.data.qpos, u.data.qvel, np.zeros(m.nu))  # rllab's reset: ctrl = init_ctrl = 0
    np.testing.assert_allclose(o, rllab_obs(name, m, f, body), rtol=0, atol=1e-9)
    rng = np.random.default_rng(5)
    clipped = touching = 0
    for t in range(120):
        a = rng.normal(0.0, 2.0, m.nu)
        clipped += int((np.abs(a) > 1).any())
        o, r, term, _, _ = env.step(a)
        f = rllab_fresh(m, u.data.qpos, u.data.qvel, np.clip(a, -1, 1))  # gear 150 on [-1, 1]: see below
        np.testing.assert_allclose(o, rllab_obs(name, m, f, body), rtol=0, atol=1e-9, err_msg=f"step {t}")
        r_ref, done = rllab_step(name, goal, m, f, body, a)
        assert r == pytest.approx(r_ref, rel=1e-9, abs=1e-9), t
        assert term == done, t
        touching += int(np.abs(f.cfrc_ext).max() > 0)
        if term:
            break
    assert clipped > 10
    if name.startswith("ant"):  # contact forces in the observation and the cost, not trivially 0
        assert touching > 10


def test_paper_ant_gear_150_is_rllabs_gear_1_behind_normalize():
    """rllab's ant motors (gear 1, ctrlrange ±150) driven by ``normalize``'s scaled action move the
    robot as the paper model's gear 150 on [-1, 1] driven by the clipped policy action."""
    text = Path(paper_model_path("ant")).read_text()
    ours = '<motor ctrllimited="true" ctrlrange="-1 1" gear="150"/>'
    assert text.count(ours) == 1
    m1 = load_model(paper_model_path("ant"))
    m2 = mujoco.MjModel.from_xml_string(text.replace(ours, '<motor ctrllimited="true" ctrlrange="-150 150"/>'))
    np.testing.assert_array_equal(m2.actuator_gear[:, 0], 1)
    d1, d2 = mujoco.MjData(m1), mujoco.MjData(m2)
    rng = np.random.default_rng(0)
    qpos = initial_qpos(m1) + 0.01 * rng.standard_normal(m1.nq)
    qvel = 0.1 * rng.standard_normal(m1.nv)
    for m, d in ((m1, d1), (m2, d2)):
        d.qpos[:], d.qvel[:] = qpos, qvel
        mujoco.mj_forward(m, d)
    lb, ub = m2.actuator_ctrlrange.T
    for _ in range(50):
        a = rng.normal(0.0, 2.0, 8)
        d1.ctrl[:] = np.clip(a, -1, 1)
        d2.ctrl[:] = np.clip(lb + (a + 1.0) * 0.5 * (ub - lb), lb, ub)
        mujoco.mj_step(m1, d1)
        mujoco.mj_step(m2, d2)
        np.testing.assert_allclose(d1.qfrc_actuator, d2.qfrc_actuator, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(d1.qpos, d2.qpos, rtol=0, atol=1e-9)
    np.testing.assert_allclose(d1.qvel, d2.qvel, rtol=0, atol=1e-8)


def test_paper_reset_noise_is_rllabs():
    env = BatchedMujoco("ant_dir", 400, threads=1, backend="threads", variant="paper")
    env.reset(rng=np.random.default_rng(0))
    dq = env.sim.qpos - env.init_qpos
    dv = env.sim.qvel - env.init_qvel
    assert dq.std() == pytest.approx(0.01, rel=0.05) and abs(dq.mean()) < 1e-3  # N(0, 0.01²)
    assert dv.std() == pytest.approx(0.1, rel=0.05) and abs(dv.mean()) < 1e-2  # N(0, 0.1²)
    ref = make("halfcheetah_vel", 1.0).unwrapped
    ref.reset(seed=11)
    g = np.random.default_rng(11)  # gymnasium's reset(seed=11) generator: the qpos normals first
    np.testing.assert_array_equal(ref.data.qpos, ref.init_qpos + g.standard_normal(9) * 0.01)
    np.testing.assert_array_equal(ref.data.qvel, g.standard_normal(9) * 0.1)


def test_paper_ant_termination_and_survival_bonus():
    env = make("ant_dir", -1.0)
    env.reset(seed=0)
    u = env.unwrapped
    for height, ends in ((0.55, False), (1.5, True), (0.1, True)):
        qpos, qvel = u.init_qpos.copy(), np.zeros(u.model.nv)
        qpos[2] = height
        u.set_state(qpos, qvel)
        _, r, term, _, info = env.step(np.zeros(8))
        assert term == ends, height
        # rllab pays the bonus on every step, the terminal one too
        assert info["reward_survive"] == 0.05
        assert r == pytest.approx(info["reward_forward"] + 0.05 + info["reward_contact"], abs=1e-12)
    # (rllab's other end, a state that is not finite, is kept but MuJoCo >= 2 does not let it
    # happen: mj_step resets a simulation whose state blows up, with a warning)


def test_paper_envs_are_registered_and_the_gym_ones_unchanged():
    for family in MUJOCO.values():
        paper = family.env_id_of("paper")
        assert paper.endswith("Paper-v0") and gym.spec(paper).max_episode_steps == 200
        assert family.env_id_of("gym") == family.env_id
    assert gym.make("mamlkit/AntDir-v0").observation_space.shape == (105,)
    assert gym.make("mamlkit/HalfCheetahVel-v0").observation_space.shape == (17,)


@pytest.mark.parametrize("name", list(MUJOCO))
def test_making_a_paper_environment_prints_and_warns_nothing(name, capfd, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(name, TASK[name]).reset(seed=0)
        BatchedMujoco(name, 2, threads=1, backend="threads", variant="paper").close()
        if has_capi():
            BatchedMujoco(name, 2, threads=1, backend="capi", variant="paper").close()
    out, err = capfd.readouterr()
    assert "WARNING" not in out + err and "deprecated" not in out + err
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()


def test_the_model_files_ship_with_the_package():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    package_data = pyproject.split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    assert '"rl/models/*.xml"' in package_data
    for robot in XML:
        assert Path(paper_model_path(robot)).is_file()


# --- the config -------------------------------------------------------------------------------


def test_env_variant_setting_and_preset():
    assert load_config("rl-ant-dir").env.variant == "gym"
    paper, base = load_config("rl-ant-dir-paper-env"), load_config("rl-ant-dir")
    assert paper.env.variant == "paper"
    base.env.variant = "paper"
    base.description = paper.description
    assert paper == base, "the preset differs from rl-ant-dir only in env.variant"
    with pytest.raises(ConfigError, match=r"env.variant.*'gym', 'paper'"):
        load_config("rl-ant-dir", ["env.variant=rllab"])
    with pytest.raises(ConfigError, match="env.variant=paper"):
        load_config("rl-navigation2d-tiny", ["env.variant=paper"])


def test_paper_variant_reaches_training(tmp_path):
    out = tmp_path / "run"
    sets = [
        "models=[maml]",
        "env.horizon=10",
        "env.sim_threads=1",
        "policy.hidden=[8]",
        "train.iterations=1",
        "train.meta_batch_size=2",
        "train.trajectories=2",
        "algo.cg_iters=2",
    ]
    args = ["train", "rl-ant-dir-paper-env", "--out", str(out), "--quiet"]
    assert cli.main(args + [x for s in sets for x in ("--set", s)]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["env"]["variant"] == "paper"
    state = torch.load(out / "maml" / "checkpoint.pt", weights_only=False)
    assert state["config"]["env"]["variant"] == "paper" and state["iteration"] == 1
    first = next(v for k, v in state["learner"].items() if k.endswith("mean.0.weight"))
    assert first.shape[1] == 125  # the policy sees rllab's observation
