"""The MuJoCo models load without MuJoCo's deprecation warning, and are the same models as before."""

import warnings

import numpy as np
import pytest

mujoco = pytest.importorskip("mujoco")
gym = pytest.importorskip("gymnasium")

from gymnasium.envs.mujoco.mujoco_env import expand_model_path  # noqa: E402

from mamlkit.rl import envs  # noqa: E402, F401  (registers the environments)
from mamlkit.rl.families import MUJOCO, XML  # noqa: E402
from mamlkit.rl.mujoco_batch import BatchedMujoco  # noqa: E402
from mamlkit.rl.mujoco_sim import load_model  # noqa: E402


@pytest.mark.parametrize("name", list(MUJOCO))
def test_making_an_environment_prints_and_warns_nothing(name, capfd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where MuJoCo would log its warnings (MUJOCO_LOG.TXT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym.make(MUJOCO[name].env_id).reset(seed=0)
        BatchedMujoco(name, 2, threads=1, backend="threads").sim.close()
    out, err = capfd.readouterr()
    assert "WARNING" not in out + err and "deprecated" not in out + err
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()


@pytest.mark.parametrize("robot", list(XML))
def test_load_model_gives_the_compiled_file_bit_for_bit(robot, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = expand_model_path(XML[robot])
    reference, model = mujoco.MjModel.from_xml_path(path), load_model(path)
    assert model.body_mass.sum() == pytest.approx(14.0 if robot == "halfcheetah" else reference.body_mass.sum())
    for field in dir(reference):
        a = getattr(reference, field)
        if not field.startswith("_") and isinstance(a, np.ndarray):
            np.testing.assert_array_equal(getattr(model, field), a, err_msg=field)
