"""The RL task families: the one table that the config, the task samplers and the gymnasium
registration read. Light on purpose (no gymnasium or MuJoCo import)."""

from __future__ import annotations

import os
from dataclasses import dataclass

NAVIGATION = "navigation2d"


@dataclass(frozen=True)
class MujocoFamily:
    """A MuJoCo task family: a robot rewarded for a goal velocity or a direction."""

    env_id: str  # gymnasium id, registered by mamlkit.rl.envs
    env_class: str  # its class in mamlkit.rl.mujoco_tasks
    robot: str  # "halfcheetah" or "ant"
    key: str  # the task parameter: "velocity" (goal ~ U[0, high]) or "direction" (+1 or -1)
    high: float | None = None  # velocity goals' upper bound; None for directions
    offset: float = 0.0  # added to the velocity term every step (the official AntVel's +1)

    @property
    def ant(self) -> bool:
        return self.robot == "ant"

    @property
    def velocity(self) -> bool:
        return self.key == "velocity"

    def env_id_of(self, variant: str) -> str:
        """The gymnasium id of this family in a variant: ``mamlkit/AntDir-v0``, ``mamlkit/AntDirPaper-v0``."""
        return self.env_id if variant == "gym" else self.env_id.replace("-v0", "Paper-v0")

    def env_class_of(self, variant: str) -> str:
        return self.env_class if variant == "gym" else self.env_class.replace("Env", "PaperEnv")


MUJOCO: dict[str, MujocoFamily] = {
    "halfcheetah_vel": MujocoFamily("mamlkit/HalfCheetahVel-v0", "HalfCheetahVelEnv", "halfcheetah", "velocity", 2.0),
    "halfcheetah_dir": MujocoFamily("mamlkit/HalfCheetahDir-v0", "HalfCheetahDirEnv", "halfcheetah", "direction"),
    "ant_vel": MujocoFamily("mamlkit/AntVel-v0", "AntVelEnv", "ant", "velocity", 3.0, offset=1.0),
    "ant_dir": MujocoFamily("mamlkit/AntDir-v0", "AntDirEnv", "ant", "direction"),
}

FAMILIES = (NAVIGATION, *MUJOCO)

# The robots as the official code (rllab) simulates them, on gymnasium's model files. rllab's
# models have no frame skip: one environment step is one MuJoCo step of 0.01 s (half-cheetah) or
# 0.02 s (ant), where gymnasium's Ant-v5/HalfCheetah-v5 step 0.05 s; on gymnasium's models
# (timestep 0.01) that is a frame skip of 1 and 2 (docs/protocol.md#rl-mujoco).
XML = {"halfcheetah": "half_cheetah.xml", "ant": "ant.xml"}
FRAME_SKIP = {"halfcheetah": 1, "ant": 2}
RESET_NOISE = 0.1  # gymnasium's reset noise scale: qpos + U(-0.1, 0.1), qvel + 0.1 N(0, 1)
CHEETAH_CTRL = 0.05  # the paper's 0.05 ||a||² (rllab: 0.5 * 0.1)
# The ant's reward weights are rllab's (survival 0.05, control 0.5 * 1e-2), not gymnasium's
# defaults (1.0 and 0.5); its contact weight is gymnasium's too. The episode ends when the torso
# height leaves Ant-v5's default healthy range.
ANT_CTRL = 0.005
ANT_SURVIVE = 0.05
ANT_CONTACT = 5e-4
ANT_CONTACT_RANGE = (-1.0, 1.0)
ANT_HEALTHY_Z = (0.2, 1.0)
ANT_MAIN_BODY = 1  # the torso: its x position gives the ant's velocity

# The variants of the MuJoCo families (``env.variant``): "gym", the definitions above on
# gymnasium's models; "paper", rllab's own environments as the official code defined them
# (docs/protocol.md#rl-mujoco): rllab's model files redrawn under rl/models/, rllab's
# observations (with the torso's centre of mass; the ant's with contact forces, orientation and
# root position), the velocity of the torso's subtree centre of mass (rllab's
# ``get_body_comvel``), rllab's reset noise, and every derived quantity taken after a
# ``mj_forward`` at the new state, as rllab's ``forward_dynamics`` did.
VARIANTS = ("gym", "paper")
PAPER_XML = {"halfcheetah": "half_cheetah.xml", "ant": "ant.xml"}
PAPER_FRAME_SKIP = {"halfcheetah": 1, "ant": 1}  # rllab's files: 0.01 s Euler, 0.02 s RK4
# rllab's MujocoEnv.reset_mujoco: qpos = init_qpos + 0.01 N(0, 1), qvel = init_qvel + 0.1 N(0, 1)
PAPER_QPOS_NOISE = 0.01
PAPER_QVEL_NOISE = 0.1
PAPER_BODY = "torso"  # the body whose subtree centre of mass gives the velocity and the observation


def paper_model_path(robot: str) -> str:
    """The file of the paper variant's ``robot`` (package data under ``mamlkit/rl/models``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", PAPER_XML[robot])
